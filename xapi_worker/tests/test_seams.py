"""The kombu and celery-batches internals the worker builds on (transport.py, worker.py).

transport.py subclasses kombu's Redis transport and overrides or calls private methods;
worker.py subclasses celery-batches' Batches. Their guarantees (no loss window, writes at
maxmemory, the flush timer after a reconnect) were proven on the exact sources hashed below.
A new kombu or celery-batches changes a hash and fails this test: read the new source of that
method, adapt the subclass, prove it with the rest of these tests, then record the new hash.
pyproject.toml pins both to the versions that pass.
"""

from __future__ import annotations

import hashlib
import inspect

import pytest
from celery_batches import Batches
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import base as virtual

from xapi_worker import transport

HASHES = {
    "redis.MultiChannelPoller._register_BRPOP": "85724582464a615f",
    "redis.MultiChannelPoller.handle_event": "0e3f07d7de1b55ff",
    "redis.Channel._brpop_start": "1d125c1e720ad5a6",
    "redis.Channel._brpop_read": "9a9f7f5a6ad96f48",
    "redis.Channel.basic_consume": "34e0da85e689ff98",
    "redis.Channel._put": "37bb64c990c13d9a",
    "redis.Channel._queue_bind": "ded2831836338e4a",
    "redis.Channel._size": "7cc839b42fdc5e3b",
    "redis.Channel._delete": "f1409b1cc951c8ea",
    "redis.Channel._has_queue": "79b4e522f2c0e8ec",
    "redis.Channel._purge": "221e37da7c172561",
    "redis.Channel.close": "101e9b9cdad44b88",
    "redis.Channel._do_restore_message": "fccdf81a0220c560",
    "redis.Channel._q_for_pri": "f3997660680dd00f",
    "redis.Channel.conn_or_acquire": "25883caca6c4121e",
    "redis.QoS.append": "35c655f6ecc62fe6",
    "redis.QoS.ack": "1bc15a4ddf541af6",
    "redis.QoS.reject": "747a02434344d1a6",
    "redis.QoS.restore_by_tag": "58e161d81b6fe18d",
    "redis.QoS.restore_visible": "56ab7a42978335ce",
    "redis.QoS._remove_from_indices": "980a109d54ad9136",
    "redis.QoS.pipe_or_acquire": "ad7f549d96c81107",
    "redis.Transport.register_with_event_loop": "fe9a27faf9e4fbc3",
    "virtual.QoS.append": "b388f0cd6485c28a",
    "virtual.QoS.ack": "0714292b916fecb2",
    "virtual.QoS.can_consume_max_estimate": "936d3958266c68d3",
    "virtual.Channel._lookup": "82b0e60149b5e172",
    "virtual.Channel._get_message_priority": "07faea72a3d7025f",
    "celery_batches.Batches.Strategy": "af1dfe19ae06175f",
    "celery_batches.Batches.flush": "7d92a1e55b831def",
    "celery_batches.Batches._do_flush": "f61e90f5361ea723",
    "celery_batches.Batches.__init__": "cb0c70efe451ea14",
}

OWNERS = {
    "redis": kombu_redis,
    "virtual": virtual,
    "celery_batches": type("celery_batches", (), {"Batches": Batches}),
}


def _source_of(name: str) -> str:
    module, cls, method = name.split(".")
    return inspect.getsource(getattr(getattr(OWNERS[module], cls), method))


@pytest.mark.parametrize("name", sorted(HASHES))
def test_upstream_source_is_the_one_proven(name):
    digest = hashlib.sha256(_source_of(name).encode()).hexdigest()[:16]
    assert digest == HASHES[name], f"{name} changed upstream: review transport.py/worker.py"


def test_every_override_of_the_transport_is_listed():
    """An override added to transport.py without its kombu source in HASHES fails here."""
    listed = {name.rsplit(".", 1)[1] for name in HASHES if name.startswith("redis.")}
    for ours, theirs in (
        (transport.Channel, kombu_redis.Channel),
        (transport.QoS, kombu_redis.QoS),
        (transport.Transport, kombu_redis.Transport),
    ):
        overridden = {
            n
            for n, v in vars(ours).items()
            if inspect.isfunction(v) and hasattr(theirs, n) and not n.startswith("__")
        }
        assert overridden <= listed, sorted(overridden - listed)


def test_kombu_attributes_the_transport_reads():
    channel_attrs = ("keyprefix_queue", "sep", "from_transport_options", "_in_poll")
    for attr in channel_attrs:
        assert hasattr(kombu_redis.Channel, attr), attr
    assert kombu_redis.PRIORITY_STEPS[0] == 0
    assert set(transport.Channel.from_transport_options) >= {"visibility_timeout", "socket_timeout"}
