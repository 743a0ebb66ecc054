"""xapi_file_current: whether a file task of the bundle's roles has nothing to do.

A copy or template task costs several round trips even when the file is already right (a
temporary directory, a stat, a file module run, the cleanup). The roles read their managed
files once (ansible.builtin.find or stat with checksums) and skip the tasks whose file
already has the content, owner, group and mode they would write; a file that is missing or
differs in any of these still goes through its task (validate, diff, notify as before).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any


def _entries(found: object) -> Iterable[Mapping[str, Any]]:
    """The entries of a registered find result, stat result or list of find entries."""
    if not found:
        return []
    if isinstance(found, Mapping):
        if "files" in found:
            return found.get("files") or []
        stat = found.get("stat")
        if isinstance(stat, Mapping):
            return [stat] if stat.get("exists") else []
        return []
    return found if isinstance(found, list) else []


def xapi_file_current(
    found: object,
    path: str,
    owner: str,
    group: str,
    mode: str,
    content: str | None = None,
) -> bool:
    """True when `found` has `path` with this owner, group, mode and (if given) content.

    `content` is the text the task would write (lookup of the template or file); None
    means a directory (its attributes only).
    """
    for entry in _entries(found):
        if entry.get("path") != path:
            continue
        if (entry.get("pw_name"), entry.get("gr_name")) != (owner, group):
            return False
        if str(entry.get("mode")) != str(mode):
            return False
        if content is None:
            return bool(entry.get("isdir"))
        digest = hashlib.sha1(str(content).encode("utf-8"), usedforsecurity=False).hexdigest()
        return entry.get("checksum") == digest
    return False


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"xapi_file_current": xapi_file_current}
