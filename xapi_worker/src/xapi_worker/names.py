"""Every name the worker shares with others: the Redis keys and key suffixes of the broker,
the message headers of the worker's bookkeeping, and the fields of the hashes it publishes.

The worker, its command line, ``check_xapi`` (roles/xapi_ops), the frontal's broker check and
the tests import them from here; the broker's ACL (roles/xapi_broker/defaults/main.yml,
``xapi_broker_worker_acl_keys``) must cover every key (xapi_worker/tests/test_names.py checks both).
Standard library only: ``check_xapi`` ships this module to hosts without the worker's venv.
"""

from __future__ import annotations

# --- Redis keys ------------------------------------------------------------------------------
#: The queue Pod routes its task to (a list; kombu adds its priority variants).
QUEUE = "xapi"
#: The dead letters' default list (``XAPI_WORKER_DEAD_LETTER_KEY``).
DEAD_LETTERS = "xapi.dead_letters"
#: Epoch seconds (a float, as a string) of the last batch the LRS accepted, set by the worker
#: on the broker the batch came from (read by ``check_xapi``).
LAST_DELIVERY = "xapi.last_delivery"
#: The workers' pipeline counters: one hash per broker (metrics.py, for Prometheus).
METRICS = "xapi.metrics"
#: Migration tokens of statements moved from Pod's Redis
#: (roles/xapi_broker/files/xapi-redis-migrate).
MIGRATED = "xapi.migrated"
#: kombu's hash of the messages delivered and not yet acknowledged, its index and its lock.
UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"
UNACKED_MUTEX = "unacked_mutex"

# --- key suffixes ----------------------------------------------------------------------------
#: ``<queue>.inflight``: the set of the nodes' in-flight lists; ``<queue>.inflight.<node>``: one.
INFLIGHT = ".inflight"
#: ``<in-flight list>.alive``: a node's heartbeat.
ALIVE = ".alive"
#: ``<in-flight list>.spool``: a node's on-disk spool, as its worker reports it (a hash).
SPOOL = ".spool"
#: ``<queue>.unreadable``: what the worker found on the queue that is not a message.
UNREADABLE = ".unreadable"


def registry_key(queue: str = QUEUE) -> str:
    """The set of the in-flight lists of ``queue``."""
    return queue + INFLIGHT


def inflight_key(queue: str, node: str) -> str:
    """The in-flight list of ``node`` for ``queue``."""
    return f"{queue}{INFLIGHT}.{node}"


def node_of(member: str, queue: str = QUEUE) -> str:
    """The node whose in-flight list is ``member``."""
    return member.removeprefix(registry_key(queue) + ".")


def alive_key(inflight: str) -> str:
    """The heartbeat of the node whose in-flight list is ``inflight``."""
    return inflight + ALIVE


def spool_state_key(queue: str, node: str) -> str:
    """The hash in which ``node`` publishes its spool's state."""
    return inflight_key(queue, node) + SPOOL


#: <in-flight list>.dead_letters: elements of the broker's dead letters a node has claimed
#: to move them to its disk (deadstore.move_legacy); empty but for a moment.
DEAD_CLAIM = ".dead_letters"


def dead_claim_key(queue: str, node: str) -> str:
    """The list through which a node moves the broker's dead letters to its disk."""
    return inflight_key(queue, node) + DEAD_CLAIM


#: ``replay-<run>@<host>``: the node name a ``dead-letters replay`` run takes while it runs
#: (registered with a heartbeat, as a worker node): each element of the broker's dead letters
#: it replays goes through its claim list (:func:`dead_claim_key`), where a stopped replay's
#: claim is found again (transport.recover_orphans puts it back, forget reads it).
REPLAY_NODE = "replay-"


def replay_node(run: str, host: str) -> str:
    """The node name of the replay run ``run`` on ``host``."""
    return f"{REPLAY_NODE}{run}@{host}"


def is_replay(member: str, queue: str = QUEUE) -> bool:
    """Whether the registry's ``member`` is a replay run's (not a worker node)."""
    return node_of(member, queue).startswith(REPLAY_NODE)


def unreadable_key(queue: str = QUEUE) -> str:
    """Where the worker sets aside what it found on ``queue`` that is not a message."""
    return queue + UNREADABLE


#: One key of each kind the workers and check_xapi use (a node named ``node``), for the test
#: that the broker's ACL covers them all.
KEYS = (
    QUEUE,
    DEAD_LETTERS,
    LAST_DELIVERY,
    METRICS,
    MIGRATED,
    UNACKED,
    UNACKED_INDEX,
    UNACKED_MUTEX,
    registry_key(),
    inflight_key(QUEUE, "node"),
    alive_key(inflight_key(QUEUE, "node")),
    spool_state_key(QUEUE, "node"),
    dead_claim_key(QUEUE, "node"),
    inflight_key(QUEUE, replay_node("run", "host")),
    alive_key(inflight_key(QUEUE, replay_node("run", "host"))),
    dead_claim_key(QUEUE, replay_node("run", "host")),
    unreadable_key(),
)

# --- message headers (the worker's bookkeeping; Pod's own task ignores them) -----------------
ATTEMPT = "xapi_attempt"
FIRST_SEEN = "xapi_first_seen"
#: exchanges in which the statement failed alone while the LRS stored others (delivery.py)
LONE_FAILURES = "xapi_lone_failures"
#: the signature of the three, by a worker (hex HMAC-SHA256)
MAC = "xapi_mac"
#: when the message was last taken from the queue (epoch seconds, stamped by the transport
#: at every take, whatever the message said): the visibility timeout counts from it
TAKEN_AT = "xapi_taken_at"
#: Celery's header: when a message is due (ISO 8601). A worker's retry carries one (its
#: countdown); the transport keeps it only on a message whose bookkeeping a worker signed (a
#: producer's far ``eta`` held the batch's prefetch slots: nothing else was delivered)
ETA = "eta"
#: Celery's header: when a message expires. The workers never set it; the transport drops it
EXPIRES = "expires"
#: the SHA-256 of a message's body as it travels, stamped by the transport at every take
#: whatever the message said: the signature of the bookkeeping headers covers it
BODY_SHA256 = "xapi_body_sha256"
#: The xAPI version every request to the LRS names, and its header.
XAPI_VERSION = "1.0.3"
XAPI_VERSION_HEADER = "X-Experience-API-Version"

# --- fields of the metrics hash (METRICS) ----------------------------------------------------
DELIVERED = "delivered"
RETRIED = "retried"
DEAD_LETTERED = "dead_lettered"
SPOOLED = "spooled"
#: ``lrs_responses:<status>``: LRS answers by HTTP status (``error``: no answer).
RESPONSES_PREFIX = "lrs_responses:"
#: Histograms: ``<name>_bucket:<le>``, ``<name>_sum``, ``<name>_count``.
BATCH_SIZE = "batch_size"
LRS_LATENCY = "lrs_latency_seconds"
BUCKET = "_bucket:"
SUM = "_sum"
COUNT = "_count"

# --- fields of a node's spool hash (``<in-flight list>.spool``, drain.py) ---------------------
SPOOL_DEPTH = "depth"
SPOOL_OLDEST = "oldest"
SPOOL_BYTES = "bytes"
SPOOL_MAX_BYTES = "max_bytes"
SPOOL_FULL = "full"
SPOOL_DAMAGED = "damaged"
SPOOL_DAMAGED_FILES = "damaged_files"
SPOOL_DAMAGED_SINCE = "damaged_since"
SPOOL_UPDATED = "updated"
# the node's dead letters, on its disk (deadstore.py)
SPOOL_DEAD_LETTERS = "dead_letters"
SPOOL_DEAD_NEW = "dead_new"
SPOOL_DEAD_OLDEST = "dead_oldest"
SPOOL_DEAD_BYTES = "dead_bytes"
SPOOL_DEAD_MAX_BYTES = "dead_max_bytes"
SPOOL_DEAD_FULL = "dead_full"
#: What a node publishes of its spool, read back by ``status`` and ``check_xapi``.
SPOOL_FIELDS = (
    SPOOL_DEPTH,
    SPOOL_OLDEST,
    SPOOL_BYTES,
    SPOOL_MAX_BYTES,
    SPOOL_FULL,
    SPOOL_DAMAGED,
    SPOOL_DAMAGED_FILES,
    SPOOL_DAMAGED_SINCE,
    SPOOL_UPDATED,
    SPOOL_DEAD_LETTERS,
    SPOOL_DEAD_NEW,
    SPOOL_DEAD_OLDEST,
    SPOOL_DEAD_BYTES,
    SPOOL_DEAD_MAX_BYTES,
    SPOOL_DEAD_FULL,
)
