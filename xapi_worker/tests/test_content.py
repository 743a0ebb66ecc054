"""Statement content from anonymous browsers, through the real worker, Redis and Ralph: any
content Pod's producer can queue ends stored or dead-lettered alone, never holding others."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from support import Proxy, pod_producer, wait_for
from xapi_testsupport.statements import video_statement
from xapi_worker.content import LONE_SURROGATE, NOT_A_NUMBER, TOO_DEEP


def _dead(r: Any) -> list[dict[str, Any]]:
    return [json.loads(x) for x in r.lrange("xapi.dead_letters", 0, -1)]


def _nested(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = {"a": [value]} if depth % 2 else {"a": value}
    return value


def _hostile() -> dict[str, tuple[dict[str, Any], str]]:
    """Statements Pod's view queues from any visitor, and the reason each is refused."""
    cut_emoji = video_statement("played", 900)
    cut_emoji["verb"]["display"] = {"en-US": "played \ud83c"}  # a string cut inside an emoji
    not_a_number = video_statement("played", 901)
    not_a_number["result"] = {"score": {"raw": float("nan")}}
    deep = video_statement("played", 902)
    deep["result"] = {"extensions": {"http://example.org/deep": _nested(900)}}
    return {
        cut_emoji["id"]: (cut_emoji, LONE_SURROGATE),
        not_a_number["id"]: (not_a_number, NOT_A_NUMBER),
        deep["id"]: (deep, TOO_DEEP),
    }


@pytest.mark.parametrize("spool", [False, True], ids=["live", "spool"])
def test_content_no_lrs_can_store_is_dead_lettered_alone(
    tmp_path: Path, spool, redis_srv, ralph, make_config, start_worker
):
    """A lone surrogate used to make the POST, the spool write and the dead-letter write all
    raise UnicodeEncodeError: its batch went back again and again, and nothing queued after
    it was stored (0 of 20 in 120 s on the lab). A statement nested 900 deep stopped the
    batch being handed to the pool (RecursionError while pickling)."""
    hostile = _hostile()
    good = [video_statement("played", n) for n in range(20)]
    settings: dict[str, Any] = {"XAPI_WORKER_BATCH_SIZE": 10}
    failing = {"on": spool}

    def respond(req):  # with the spool: the LRS fails first, statements go to the spool
        if req.method == "POST" and failing["on"]:
            return 503, {"Content-Type": "application/json"}, b'{"detail":"down"}'
        return None

    proxy = Proxy(upstream_port=ralph.port, respond=respond).start()
    if spool:
        spool_dir = tmp_path / "spool"
        spool_dir.mkdir(mode=0o700)
        settings.update(XAPI_WORKER_SPOOL_DIR=spool_dir, XAPI_WORKER_SPOOL_AFTER=1)
    try:
        worker = start_worker(make_config(proxy.url, **settings), name="content")
        r = redis_srv.client()
        with pod_producer(redis_srv.url()) as delay:
            for n, statement in enumerate(good):
                delay(statement)
                if n % 7 == 3:
                    for bad, _ in hostile.values():
                        delay(bad)
        if spool:
            assert wait_for(lambda: "spooled" in worker.text(), 30), worker.text()[-3000:]
            failing["on"] = False
        assert wait_for(lambda: len(ralph.stored()) == len(good), 60), worker.text()[-3000:]
        assert sorted(ralph.stored_ids()) == sorted(s["id"] for s in good)
        expected = 3 * len(hostile)
        assert wait_for(lambda: len(_dead(r)) == expected, 30), worker.text()[-3000:]
        for entry in _dead(r):
            statement_id = entry["statement"]["id"]
            assert entry["reason"] == hostile[statement_id][1]
        assert wait_for(lambda: r.llen("xapi") == 0 and r.hlen("unacked") == 0, 30)
        assert "UnicodeEncodeError" not in worker.text()
        assert "Traceback" not in worker.text()
    finally:
        proxy.stop()
