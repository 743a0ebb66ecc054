"""``xapi-worker``: operator commands (check, status, dead letters, the spool, effective
settings)."""

from __future__ import annotations

import argparse
import contextlib
import enum
import functools
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import redis
import requests

from . import __version__
from .consumer import BODY
from .content import STATEMENT_CUT, json_text
from .deadletters import STATUS_FIELDS, RedisAccess, ReplayClaim
from .deadstore import DiskDeadLetters, disk_dead_letters
from .lrs import LRSClient, excerpt
from .names import QUEUE, XAPI_VERSION
from .settings import (
    TASK_NAME,
    Settings,
    SettingsError,
    load_settings,
)
from .spool import Spool, SpoolError, node_file
from .urls import mask_url


class Exit(enum.IntEnum):
    """Exit codes of ``xapi-worker`` and of the worker's start (``CONFIG``), in one place."""

    OK = 0
    UNEXPECTED = 1
    USAGE = 2
    CONFIG = 3
    BROKER_UNREACHABLE = 4
    BROKER_AUTH = 5
    LRS_UNREACHABLE = 6
    LRS_AUTH = 7
    LRS_REJECTED = 8
    LRS_TLS = 9
    #: As the worker's own start (EX_TEMPFAIL): a spool that cannot be opened (a full disk,
    #: an I/O error, a newer format), or a set-aside file left unread.
    SPOOL_UNAVAILABLE = 75
    INCOMPLETE = 10


EXIT_MEANINGS = {
    Exit.OK: "OK",
    Exit.UNEXPECTED: "unexpected error",
    Exit.USAGE: "usage",
    Exit.CONFIG: "configuration error",
    Exit.BROKER_UNREACHABLE: "broker unreachable",
    Exit.BROKER_AUTH: "broker authentication refused",
    Exit.LRS_UNREACHABLE: "LRS unreachable",
    Exit.LRS_AUTH: "LRS credentials refused",
    Exit.LRS_REJECTED: "LRS rejected the request",
    Exit.LRS_TLS: "LRS TLS verification failed",
    Exit.SPOOL_UNAVAILABLE: "a spool cannot be opened, or a set-aside one not read",
    Exit.INCOMPLETE: "forget incomplete: statements in a worker's hands, or spool files not read",
}


class Failure(Exception):
    def __init__(self, code: Exit, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _broker_failure(exc: Exception, settings: Settings) -> Failure:
    where = settings.broker_url_masked
    if isinstance(exc, redis.AuthenticationError) or (
        isinstance(exc, redis.ResponseError)
        and str(exc).split(" ", 1)[0] in ("NOAUTH", "WRONGPASS", "NOPERM")
    ):
        return Failure(
            Exit.BROKER_AUTH,
            f"broker {where} refused authentication or permission "
            f"({type(exc).__name__}): check the password in XAPI_CELERY_BROKER_URL",
        )
    return Failure(
        Exit.BROKER_UNREACHABLE,
        f"broker {where} unreachable ({type(exc).__name__}): check XAPI_CELERY_BROKER_URL, "
        "the network and Redis",
    )


@contextlib.contextmanager
def _broker(settings: Settings) -> Iterator[RedisAccess]:
    """The broker, answering: any Redis error inside the block becomes its Failure."""
    access = RedisAccess(settings)
    try:
        access.client.ping()
        yield access
    except redis.RedisError as exc:
        raise _broker_failure(exc, settings) from None


def cmd_check(settings: Settings, _args: argparse.Namespace) -> int:
    with _broker(settings) as access:
        state = access.status()
    print(f"OK broker {settings.broker_url_masked}: reachable, queue {QUEUE}: {state['queue']}")
    client = LRSClient(settings)
    url = mask_url(settings.lrs_url)
    try:
        response = client.probe()
    except requests.exceptions.SSLError as exc:
        raise Failure(
            Exit.LRS_TLS,
            f"LRS {url}: TLS verification failed ({type(exc).__name__}): check the "
            "certificate or XAPI_WORKER_CA_BUNDLE",
        ) from None
    except requests.RequestException as exc:
        raise Failure(
            Exit.LRS_UNREACHABLE,
            f"LRS {url} unreachable ({type(exc).__name__}): check XAPI_LRS_URL and the network",
        ) from None
    status = response.status_code
    if status in (401, 403):
        raise Failure(
            Exit.LRS_AUTH,
            f"LRS {url} refused the credentials (HTTP {status}): check XAPI_LRS_LOGIN/XAPI_LRS_PWD",
        )
    if status != 200:
        answer = excerpt(response.text, settings.lrs_password)[:200]
        raise Failure(
            Exit.LRS_REJECTED,
            f"LRS {url} answered HTTP {status} to GET statements?limit=1 with "
            f"X-Experience-API-Version: {XAPI_VERSION}: check XAPI_LRS_URL "
            f"(answer: {answer!r})",
        )
    version = response.headers.get("X-Experience-API-Version", "not stated")
    print(
        f"OK LRS {url}: credentials and X-Experience-API-Version {XAPI_VERSION} accepted "
        f"(HTTP 200, LRS version header: {version})"
    )
    return Exit.OK


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    with _broker(settings) as access:
        state = access.status()
    print(state[args.field] if args.field else json.dumps(state))
    return Exit.OK


def cmd_settings(settings: Settings, _args: argparse.Namespace) -> int:
    print(json.dumps(settings.public_view(), indent=2))
    return Exit.OK


#: Where ``dead-letters`` looks: this host's disk (the spool files of its nodes), the
#: broker's list, or both.
WHERE = ("all", "disk", "broker")


def _dead_stores(settings: Settings, args: argparse.Namespace) -> list[DiskDeadLetters]:
    """The dead letters on this host's disk (every node's spool file, or those of
    ``--node``): none with the spool off, or with ``--where broker``."""
    if args.where == "broker" or not settings.spool_enabled:
        return []
    directory = Path(settings.spool_dir)
    wanted = {node_file(n).removesuffix(".sqlite3") for n in args.node or ()}
    names = set(args.node or ())
    stores = []
    for path in sorted(directory.glob("*.sqlite3")):
        stem = path.name.removesuffix(".sqlite3")
        if wanted and stem not in wanted and stem.partition("@")[0] not in names:
            continue
        spool = Spool(
            directory,
            stem,
            settings.spool_max_mb * 1024**2,
            settings.batch_size,
            settings.max_statement_bytes,
        )
        stores.append(disk_dead_letters(spool, settings))
    return stores


def _always() -> bool:
    return True


def _dead_entries(
    settings: Settings,
    args: argparse.Namespace,
    access: RedisAccess,
    claim: ReplayClaim | None = None,
) -> Iterator[tuple[Callable[[], bool], Callable[[], int], dict[str, Any]]]:
    """Every dead letter to act on, oldest first where by where (this host's disk, then the
    broker's list), each with what takes it (False: gone meanwhile) and what removes it
    (returns how many it removed), at most ``--limit``. ``claim``: a broker element is taken
    through it (ReplayClaim), else it is removed where it is."""
    n = 0
    for store in _dead_stores(settings, args):
        with _opened(store.spool):
            for row_id, entry in store.entries(args.limit - n if args.limit else 0):
                entry["kept_in"] = store.spool.path.name
                yield _always, functools.partial(store.delete, [row_id]), entry
                n += 1
        if args.limit and n >= args.limit:
            return
    if args.where == "disk":
        return
    for raw, entry in list(access.entries()):
        if args.limit and n >= args.limit:
            return
        entry["kept_in"] = access.key
        if claim is None:
            yield _always, functools.partial(access.remove, raw), entry
        else:
            yield functools.partial(claim.take, raw), claim.done, entry
        n += 1


def cmd_dead_list(settings: Settings, args: argparse.Namespace) -> int:
    with _broker(settings) as access:
        for _take, _remove, entry in _dead_entries(settings, args, access):
            print(json_text(entry, compact=False))
    return Exit.OK


def cmd_dead_replay(settings: Settings, args: argparse.Namespace) -> int:
    """Each dead letter's statement back on the queue, then the dead letter removed (a stop
    between the two replays it again: the statement keeps its id, the LRS stores it once).
    An element of the broker's list is claimed first (deadletters.ReplayClaim): one taken
    meanwhile by another process (a node moving it to its disk) is not sent, and counted."""
    from .worker import make_celery  # Celery only for the commands that publish

    replayed = skipped = cut = gone = 0
    with _broker(settings) as access:
        app = make_celery(settings, name="xapi_worker_replay")
        claim = ReplayClaim(access.client, access.key, settings.visibility_timeout)
        try:
            with claim:
                for take, remove, entry in _dead_entries(settings, args, access, claim):
                    statement = entry.get("statement")
                    # Not a statement: the head of a message the worker could not read
                    # (consumer.py), which the LRS would refuse under another reason.
                    if (
                        not isinstance(statement, dict)
                        or "unparsable" in entry
                        or BODY in statement
                    ):
                        skipped += 1
                        continue
                    # The summary of a statement too large to keep (content.bounded): the
                    # statement itself is gone, and would be too large again.
                    if STATEMENT_CUT in statement:
                        cut += 1
                        continue
                    if not take():
                        gone += 1
                        continue
                    app.send_task(TASK_NAME, args=[statement])
                    if not remove():
                        gone += 1  # replayed, and removed meanwhile by another
                    replayed += 1
        except (redis.RedisError, Failure):
            raise
        except Exception as exc:  # kombu's OperationalError and friends
            raise Failure(
                Exit.BROKER_UNREACHABLE,
                f"replay stopped after {replayed} statements: cannot publish to "
                f"{settings.broker_url_masked} ({type(exc).__name__})",
            ) from None
        finally:
            app.close()
    print(f"replayed {replayed} dead letters onto queue {QUEUE}; skipped {skipped + cut}")
    if cut:
        print(
            f"{cut} of the skipped dead letters keep only the summary of a statement too "
            f"large to send ({STATEMENT_CUT}: its id, actor, size, SHA-256 and head); they "
            "stay until purged or expired"
        )
    if gone:
        print(
            f"{gone} dead letters were moved or removed by another process while this replay "
            "ran (a node moving the broker's list to its disk, another replay, a purge): "
            "run `dead-letters list` again"
        )
    return Exit.OK


def cmd_dead_purge(settings: Settings, args: argparse.Namespace) -> int:
    if args.older_than is not None and args.older_than < 0:
        print("--older-than takes a number of days >= 0", file=sys.stderr)
        return Exit.USAGE
    if args.older_than is None and not args.yes:
        print("purge deletes every dead letter: pass --yes (or --older-than DAYS)", file=sys.stderr)
        return Exit.USAGE
    count = 0
    with _broker(settings) as access:
        for store in _dead_stores(settings, args):
            with _opened(store.spool):
                if args.older_than is not None:
                    count += store.purge_older(args.older_than)
                else:
                    count += store.purge()
        if args.where != "disk":
            if args.older_than is not None:
                count += access.purge_older(args.older_than)
            else:
                count += access.purge()
    if args.older_than is not None:
        print(f"purged {count} dead letters older than {args.older_than:g} days")
    else:
        print(f"purged {count} dead letters")
    return Exit.OK


def cmd_forget(settings: Settings, args: argparse.Namespace) -> int:
    """Remove one learner's statements from this broker and this host's spools
    (forget.py); prints how many were removed where, as JSON, never who."""
    from .forget import Forgetter, Learner, LearnerError

    agent: dict[str, Any] = {}
    try:
        given = [a for a in (args.mbox, args.account, args.name) if a is not None]
        if args.stdin and given:
            raise LearnerError("--stdin takes the learner alone: no --mbox, --account, --name")
        if args.stdin:
            agent = json.loads(sys.stdin.read())
        else:
            if args.mbox is not None:
                agent["mbox"] = args.mbox
            if args.account is not None:
                agent["account"] = {"homePage": args.account[0], "name": args.account[1]}
            if args.name is not None:
                agent["name"] = args.name
        learner = Learner.of(agent, name_is_unique=args.name_is_unique)
    except (ValueError, LearnerError) as exc:
        # The reason names the field; a JSON error may quote the input: not printed.
        why = str(exc) if isinstance(exc, LearnerError) else "stdin is not one JSON object"
        print(f"forget: {why}", file=sys.stderr)
        return Exit.USAGE
    if args.wait < 0:
        print("--wait takes a number of seconds >= 0", file=sys.stderr)
        return Exit.USAGE
    if learner.name_ignored:
        print(
            "forget: the name given was not used: the mbox or the account identifies the "
            "learner (a name would only narrow the match and miss statements)",
            file=sys.stderr,
        )
    with _broker(settings) as access:
        report = Forgetter(settings, access.client, learner, wait_seconds=args.wait).run()
    print(json.dumps(report.as_dict()))
    if report.in_hands:
        print(
            f"forget: {report.in_hands} statements of this learner were still in a worker's "
            f"hands after {args.wait:g} s (a retry's countdown, an LRS not answering): run "
            "forget again later",
            file=sys.stderr,
        )
    if report.spool_files_not_read or report.spool_damaged_files:
        print(
            f"forget: {report.spool_files_not_read} spool files of this host could not be read "
            f"(see the log above) and {report.spool_damaged_files} were set aside as damaged: "
            "they may hold this learner's statements. Run forget again once the node has "
            "started again; a set-aside file is read by no one but `spool drain`, which puts "
            "its statements back in the node's spool: run forget again right after it",
            file=sys.stderr,
        )
    if report.spool_salvaged_files:
        print(
            f"forget: {report.spool_salvaged_files} set-aside spool files of this host were "
            "drained by `spool drain` (*.salvaged): what it could read of them is in the "
            "node's spool, where this run erased the learner's statements, but each file "
            "still holds copies that forget does not open: remove them once inspected",
            file=sys.stderr,
        )
    if not report.complete:
        return Exit.INCOMPLETE
    return Exit.OK


def _spools(settings: Settings, node: str | None) -> list[Spool]:
    if not settings.spool_enabled:
        raise Failure(Exit.CONFIG, "the spool is off: XAPI_WORKER_SPOOL_DIR is not set")
    directory = Path(settings.spool_dir)
    if node:
        names = [node_file(node)]
        if not (directory / names[0]).exists():
            raise Failure(Exit.USAGE, f"no spool of node {node} in {directory}")
    else:
        names = sorted(p.name for p in directory.glob("*.sqlite3"))
    limit = settings.spool_max_mb * 1024**2
    return [
        Spool(
            directory,
            name.removesuffix(".sqlite3"),
            limit,
            settings.batch_size,
            settings.max_statement_bytes,
        )
        for name in names
    ]


@contextlib.contextmanager
def _opened(spool: Spool) -> Iterator[Spool]:
    """A spool for a command: one that cannot be opened (a newer format, a full disk)
    becomes its Failure; closed on the way out."""
    try:
        yield spool
    except SpoolError as exc:
        raise Failure(Exit.SPOOL_UNAVAILABLE, str(exc)) from None
    finally:
        spool.close()


def cmd_spool_list(settings: Settings, args: argparse.Namespace) -> int:
    """One JSON line per spooled statement, oldest first (statement ids, not bodies, unless
    --statements: the bodies carry learners' identities)."""
    now = time.time()
    for spool in _spools(settings, args.node):
        with _opened(spool):
            for n, row in enumerate(spool.rows(args.limit or -1)):
                entry: dict[str, Any] = {
                    "node_file": spool.path.name,
                    "statement_id": row.statement.get("id"),
                    "attempts": row.attempts,
                    "age_s": round(now - row.first_seen, 1),
                    "next_attempt_in_s": round(max(0.0, row.next_at - now), 1),
                    "last_error": row.last_error,
                }
                if args.statements:
                    entry["statement"] = row.statement
                print(json_text(entry, compact=False))
                if args.limit and n + 1 >= args.limit:
                    break
    return Exit.OK


def cmd_spool_drain(settings: Settings, args: argparse.Namespace) -> int:
    """Deliver every spooled statement now, in the foreground, oldest first, with the
    readable rows of the files set aside as damaged (salvage.py); stops at the first batch
    the LRS does not take (exit 6). A set-aside file that could not be read whole is said,
    and the exit status is then 75."""
    from .drain import DrainProcessor  # Celery only for the commands that deliver
    from .salvage import salvage
    from .worker import make_celery

    app = make_celery(settings, name="xapi_worker_drain")
    total = 0
    left: list[str] = []
    try:
        for spool in _spools(settings, args.node):
            with _opened(spool):
                spool.open()
                for path in spool.damaged_files():
                    result = salvage(path, spool, disk_dead_letters(spool, settings))
                    print(result.line(), file=sys.stderr if result.error else sys.stdout)
                    if result.error or result.unreadable:
                        left.append(path.name)
                processor = DrainProcessor(app, settings, spool)
                spool.wake()
                while True:
                    rows = spool.rows(settings.batch_size)
                    if not rows:
                        break
                    settled, kept = processor.drain(rows)
                    total += settled
                    if kept:
                        print(
                            f"drained {total} statements; {spool.path.name}: the LRS did not "
                            f"take {kept} (see the worker's log or `xapi-worker check`)",
                            file=sys.stderr,
                        )
                        return Exit.LRS_UNREACHABLE
    finally:
        app.close()
    print(f"drained {total} statements")
    if left:
        print(
            f"not read whole: {', '.join(left)} (see the lines above; kept for inspection)",
            file=sys.stderr,
        )
        return Exit.SPOOL_UNAVAILABLE
    return Exit.OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xapi-worker",
        description="Operator commands of the Pod xAPI worker. Settings come from the file "
        "named by XAPI_WORKER_CONFIG, overridden by the environment.",
        epilog="Exit codes: "
        + ", ".join(f"{int(code)} {meaning}" for code, meaning in EXIT_MEANINGS.items())
        + ".",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="broker reachable and LRS accepting credentials").set_defaults(
        func=cmd_check
    )
    status = sub.add_parser("status", help="JSON: queue length, dead letters, unacked")
    status.add_argument("--field", choices=STATUS_FIELDS, help="print this number only")
    status.set_defaults(func=cmd_status)
    # kept for the scripts that use it: `status --field queue`
    sub.add_parser("queue-length", help="messages waiting in queue xapi").set_defaults(
        func=cmd_status, field="queue"
    )
    sub.add_parser("settings", help="effective settings as JSON, secrets masked").set_defaults(
        func=cmd_settings
    )
    dead = sub.add_parser(
        "dead-letters",
        help="list, replay or purge dead letters",
        description="The dead letters of this host's nodes (on its disk, in their spool "
        "files) and of the broker's list (XAPI_WORKER_DEAD_LETTER_KEY: a node without a "
        "spool, or of an older release), oldest first, one place after the other.",
    )
    dsub = dead.add_subparsers(dest="action", required=True)
    lst = dsub.add_parser("list", help="one JSON entry per line")
    rep = dsub.add_parser("replay", help="re-enqueue onto queue xapi, then remove them")
    pur = dsub.add_parser("purge", help="delete every dead letter, or the older ones")
    for action in (lst, rep, pur):
        action.add_argument(
            "--where",
            choices=WHERE,
            default="all",
            help="this host's disk, the broker's list, or both (default)",
        )
        action.add_argument(
            "--node",
            action="append",
            metavar="NODE",
            help="this node's dead letters only, on this host's disk (xapi@host, or xapi): "
            "may be repeated",
        )
    for action in (lst, rep):
        action.add_argument("--limit", type=int, default=0)
    lst.set_defaults(func=cmd_dead_list)
    rep.set_defaults(func=cmd_dead_replay)
    pur.add_argument("--yes", action="store_true", help="confirm deleting every dead letter")
    pur.add_argument(
        "--older-than", type=float, metavar="DAYS", help="delete those written DAYS days ago"
    )
    pur.set_defaults(func=cmd_dead_purge)
    fgt = sub.add_parser(
        "forget",
        help="remove a learner's statements from the broker and this host's spools",
        description="Remove the statements of one learner (any agent of a statement: by mbox "
        "or account, a name narrowing them; by name alone only with --name-is-unique) from "
        "the queue, the in-flight lists, unacked, this host's spools, "
        "the dead letters and xapi.unreadable; prints how many were removed where. Not "
        "reached: the LRS, backups, Pod's own Redis. Options on the command line are seen "
        "by other users of the host (ps): prefer --stdin.",
    )
    fgt.add_argument(
        "--stdin",
        action="store_true",
        help='the learner as a JSON object on stdin: {"mbox": ...}, {"account": {"homePage": '
        '..., "name": ...}}, or both, with or without "name" (narrowing); {"name": ...} '
        "alone with --name-is-unique",
    )
    fgt.add_argument("--mbox", help="mailto:address (or the address)")
    fgt.add_argument("--account", nargs=2, metavar=("HOMEPAGE", "NAME"), help="an account")
    fgt.add_argument(
        "--name",
        help="the agent's name (Pod: the user name, or its hash); with --mbox or --account "
        "it is not used (it would miss statements under another name), alone it needs "
        "--name-is-unique",
    )
    fgt.add_argument(
        "--name-is-unique",
        action="store_true",
        help="take a name alone (--name, or stdin's name without mbox or account): every "
        "statement of an agent of that name is erased, so only where names are unique "
        "(XAPI_ANONYMIZE_ACTOR: a hash as the name)",
    )
    fgt.add_argument(
        "--wait",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how long to wait, in all, for the workers to settle the learner's statements "
        f"they hold (default 120); then exit {int(Exit.INCOMPLETE)}",
    )
    fgt.set_defaults(func=cmd_forget)
    spool = sub.add_parser("spool", help="list or drain the node spools of this host")
    ssub = spool.add_subparsers(dest="action", required=True)
    slst = ssub.add_parser("list", help="one JSON line per spooled statement, oldest first")
    slst.add_argument("--node", help="this node's spool only (e.g. xapi@host)")
    slst.add_argument("--limit", type=int, default=0)
    slst.add_argument(
        "--statements", action="store_true", help="include the statements (personal data)"
    )
    slst.set_defaults(func=cmd_spool_list)
    sdr = ssub.add_parser("drain", help="deliver the spool now, in the foreground")
    sdr.add_argument("--node", help="this node's spool only (e.g. xapi@host)")
    sdr.set_defaults(func=cmd_spool_drain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"xapi-worker: configuration error: {exc}", file=sys.stderr)
        return Exit.CONFIG
    try:
        code = int(args.func(settings, args))
    except Failure as failure:
        print(f"FAIL {failure.message}", file=sys.stderr)
        return failure.code
    except Exception as exc:
        print(f"xapi-worker: unexpected error: {type(exc).__name__}", file=sys.stderr)
        return Exit.UNEXPECTED
    return code


if __name__ == "__main__":
    sys.exit(main())
