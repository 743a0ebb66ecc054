"""names.py is the one place of the broker's key names, the bookkeeping headers and the
metrics hash's fields: no other module of the package spells one, and the broker's ACL
(the broker role's defaults) lets the workers and check_xapi reach every key they use."""

from __future__ import annotations

import ast
import re
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
from support import REPO
from xapi_worker.check import broker as check_broker

from xapi_worker import names

SOURCE = REPO / "xapi_worker" / "src" / "xapi_worker"
#: The broker role's defaults (roles/xapi_broker once renamed from roles/redis).
BROKER_DEFAULTS = [REPO / "roles" / r / "defaults" / "main.yml" for r in ("xapi_broker", "redis")]
#: kombu's own names ("unacked" is also the label of a count in status and forget's report).
KOMBU = {names.UNACKED, names.UNACKED_INDEX, names.UNACKED_MUTEX}
#: What no module but names.py may write as a string: keys, key suffixes, headers, and the
#: field names of the metrics hash that are not plain words.
WATCHED = (
    (set(names.KEYS) - KOMBU)
    | {names.INFLIGHT, names.ALIVE, names.SPOOL, names.UNREADABLE}
    | {names.ATTEMPT, names.FIRST_SEEN, names.LONE_FAILURES, names.MAC, names.TAKEN_AT}
    | {names.RESPONSES_PREFIX, names.BUCKET, names.BATCH_SIZE, names.LRS_LATENCY}
)


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def spelled_names(path: Path, root: Path = SOURCE) -> list[str]:
    """The string constants of ``path`` (docstrings aside) that are one of names.py's names or
    a key under ``xapi.``, as ``file:line: 'text'``."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = _docstrings(tree)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str):
            continue
        text = node.value
        if id(node) not in docstrings and (text in WATCHED or text.startswith(names.QUEUE + ".")):
            out.append(f"{path.relative_to(root)}:{node.lineno}: {text!r}")
    return out


def test_no_module_but_names_spells_a_key_or_header() -> None:
    found = []
    for path in sorted(SOURCE.rglob("*.py")):
        if path.name != "names.py":
            found += spelled_names(path)
    assert not found, "declare these in names.py and import them:\n" + "\n".join(found)


def test_the_scan_finds_a_spelled_key(tmp_path: Path) -> None:
    """The scan itself: a module writing the dead letters' key by hand is caught."""
    module = tmp_path / "probe.py"
    module.write_text('"""Naming xapi.dead_letters here is fine."""\nKEY = "xapi.dead_letters"\n')
    assert spelled_names(module, tmp_path) == ["probe.py:2: 'xapi.dead_letters'"]


#: The broker role's ACL key lists: the workers' and the monitoring user's, by their names
#: after the rename of roles/redis (#35-2) and before it.
WORKER_ACL = ("xapi_broker_worker_acl_keys", "redis_xapi_acl_keys")
MONITOR_ACL = ("xapi_broker_monitor_acl_keys", "redis_xapi_monitor_acl_keys")


def acl_patterns(variables: tuple[str, ...]) -> list[str]:
    """The key patterns of the first of ``variables`` the broker role's defaults hold
    (without any ``%R~``/``%W~`` prefix): a plain reading of a YAML list of scalars."""
    defaults = next(p for p in BROKER_DEFAULTS if p.is_file())
    patterns: list[str] = []
    inside = False
    for line in defaults.read_text().splitlines():
        if re.match(rf"^({'|'.join(variables)}):\s*$", line):
            inside = True
            continue
        if inside:
            item = re.match(r"^\s+-\s+(\"[^\"]*\"|'[^']*'|\S+)", line)
            if item is None:
                if line.strip() and not line.lstrip().startswith("#"):
                    break
                continue
            pattern = item.group(1).strip("\"'")
            patterns.append(re.sub(r"^%[RW]+~", "", pattern))
    assert patterns, f"none of {variables} in {defaults}"
    return patterns


def covered(key: str, patterns: list[str]) -> bool:
    # Redis' glob: * ? [..] as fnmatch's (the ACL uses no [^..] nor escapes)
    return any(fnmatchcase(key, pattern) for pattern in patterns)


@pytest.mark.parametrize("key", names.KEYS)
def test_the_workers_acl_covers_every_key(key: str) -> None:
    assert covered(key, acl_patterns(WORKER_ACL)), key


@pytest.mark.parametrize("key", check_broker.KEYS_READ)
def test_the_monitoring_acl_covers_what_check_xapi_reads(key: str) -> None:
    assert covered(key, acl_patterns(MONITOR_ACL)), key


def test_a_replay_run_is_told_from_a_worker_node() -> None:
    """A `dead-letters replay` run registers as a node while it runs (its claim list):
    check_xapi counts it as no worker node."""
    replay = names.inflight_key(names.QUEUE, names.replay_node("123.ab", "host"))
    assert names.dead_claim_key(names.QUEUE, names.replay_node("123.ab", "host")) == (
        replay + names.DEAD_CLAIM
    )
    assert names.is_replay(replay)
    assert not names.is_replay(names.inflight_key(names.QUEUE, "xapi@host"))
    assert not names.is_replay(names.inflight_key(names.QUEUE, "replay@host"))
