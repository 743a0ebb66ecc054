#!/usr/bin/python3
"""Ansible module: write a file, or a marked block of one, inside a tree another user owns
(Pod's, which `pod` owns), checking and writing in one step.

The ordinary way (a stat of the path, then `blockinfile` or `template`) leaves a window
between the check and the write in which the tree's owner can put a link in place of the file
or of a directory above it: root then writes (or reads, then hands back) a file that user may
not touch. Here every directory of the path is opened relative to its parent's descriptor
without following links (O_NOFOLLOW, O_DIRECTORY), the file likewise; what was opened is
checked on its descriptor (fstat: a regular file with one link, owned by root or by the
directory's owner), and the new content goes to a file root creates in that directory
(O_CREAT | O_EXCL | O_NOFOLLOW), given its owner and mode on the descriptor (fchown,
fchmod), then renamed over the name. Nothing is ever done by path name once the directory is
open. The tree's owner also chooses the file's size: root reads at most `max_bytes` of it
(4 MiB by default, a hundred times a large settings_local.py), and refuses a bigger file,
naming it, rather than reading it whole into memory.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import secrets
import stat
from typing import Any

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: xapi_pod_file
short_description: Write a file or a block of one in another user's tree, following no link
description:
  - Opens each directory of I(path) relative to its parent without following links, and the
    file likewise; checks what was opened on its descriptor; writes a new file in the
    directory and renames it over the name. A link anywhere on the path, or a file that is not
    a regular file with a single link owned by root or by its directory's owner, is refused
    before anything is written.
options:
  path: {description: Absolute path of the file., type: path, required: true}
  state:
    description:
      - present or absent (the file, or with I(marker) the block). With I(marker), absent
        leaves a file without the block as it is (its owner and mode too), and a path whose
        directory does not exist is nothing to remove.
    type: str
    default: present
    choices: [present, absent]
  content: {description: The whole file (without I(marker))., type: str}
  block: {description: The lines between the markers (with I(marker))., type: str}
  marker: {description: "Marker line, with {mark} replaced by BEGIN and END.", type: str}
  owner: {description: Owner of the file written., type: str, required: true}
  group: {description: Group of the file written., type: str, required: true}
  mode: {description: Mode of the file written (octal string)., type: str, required: true}
  python: {description: Refuse a result that Python cannot compile., type: bool, default: false}
  max_bytes:
    description:
      - The most of the existing file root reads (the tree's owner chooses its size). A
        bigger file is refused, naming it, and left unchanged.
    type: int
    default: 4194304
notes:
  - In check mode nothing is written; with I(marker), the result's C(found) says whether the
    file holds a line of the markers (read the same way), so a read-only check can look for a
    block without following a link of the tree's owner.
"""

RETURN = r"""
found:
  description: With I(marker), whether the file holds the BEGIN or the END line of the markers.
  returned: with marker
  type: bool
"""

READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# The most of an existing file read by default: 4 MiB (Pod's settings_local.py is a few kB).
MAX_BYTES = 4 << 20


class Refused(Exception):
    """The path is not what it says: nothing was written."""


class TooLarge(Exception):
    """The file is bigger than what root reads of it: nothing was written."""


def open_directory(path: str) -> int:
    """A descriptor of ``path``'s directory, reached from / one component at a time, no
    component a link."""
    parts = [p for p in os.path.dirname(path).split("/") if p]
    fd = os.open("/", DIR_FLAGS)
    walked = ""
    try:
        for part in parts:
            walked += "/" + part
            try:
                child = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as error:
                if error.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise Refused(f"{walked} is a link or not a directory") from None
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_existing(
    dir_fd: int, name: str, path: str, max_bytes: int = MAX_BYTES
) -> tuple[bytes | None, os.stat_result | None]:
    """The file's content and status, or (None, None) when there is none. Checked on what was
    opened: a regular file, one link (a hard link could be any file of the system), owned by
    root or by the directory's owner, at most ``max_bytes`` long (its size on the descriptor,
    and what is read: it may grow meanwhile)."""
    try:
        fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None, None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise Refused(f"{path} is a link") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(f"{path} is not a regular file")
        if st.st_nlink != 1:
            raise Refused(f"{path} has {st.st_nlink} hard links")
        if st.st_uid not in (0, os.fstat(dir_fd).st_uid):
            raise Refused(
                f"{path} belongs to uid {st.st_uid}, neither root nor its directory's owner"
            )
        if st.st_size > max_bytes:
            raise TooLarge(f"{path} holds {st.st_size} bytes")
        chunks, size = [], 0
        while size <= max_bytes and (chunk := os.read(fd, min(1 << 16, max_bytes + 1 - size))):
            chunks.append(chunk)
            size += len(chunk)
        if size > max_bytes:
            raise TooLarge(f"{path} grew past that while it was read")
        return b"".join(chunks), st
    finally:
        os.close(fd)


def has_block(original: bytes | None, marker: str) -> bool:
    """Whether ``original`` holds a line of the markers (BEGIN or END)."""
    lines = set((original or b"").splitlines(True))
    return any(marker.replace("{mark}", m).encode() + b"\n" in lines for m in ("BEGIN", "END"))


def with_block(original: bytes | None, marker: str, block: str, present: bool) -> bytes:
    """``original`` with the marked block replaced, added at the end, or removed (the layout
    ansible.builtin.blockinfile gives: the markers' lines, the block, a line break each)."""
    begin = marker.replace("{mark}", "BEGIN").encode() + b"\n"
    end = marker.replace("{mark}", "END").encode() + b"\n"
    lines = (original or b"").splitlines(True)
    wanted: list[bytes] = []
    if present and block:
        body = block.encode()
        if not body.endswith(b"\n"):
            body += b"\n"
        wanted = [begin, *body.splitlines(True), end]
    first = last = None
    for i, line in enumerate(lines):
        if line == begin:
            first = i
        if line == end:
            last = i
    if first is None or last is None:
        at = len(lines)
    else:
        at = min(first, last)
        del lines[at : max(first, last) + 1]
    if at > 0 and not lines[at - 1].endswith(b"\n"):
        lines[at - 1] += b"\n"
    lines[at:at] = wanted
    return b"".join(lines)


def write_new(dir_fd: int, name: str, data: bytes, uid: int, gid: int, mode: int) -> None:
    """``data`` in a new file of the directory, its owner and mode set on the descriptor, then
    renamed over ``name``; the name must then be that very file."""
    temp = f".{name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(
        temp,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=dir_fd,
    )
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        written = os.fstat(fd)
        now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if (now.st_dev, now.st_ino) != (written.st_dev, written.st_ino):
            raise Refused(f"{name} was replaced while it was written")
    except BaseException:
        try:
            os.unlink(temp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
    finally:
        os.close(fd)
    os.fsync(dir_fd)


def run(module: AnsibleModule) -> dict[str, Any]:
    p = module.params
    path = os.path.normpath(p["path"])
    if not os.path.isabs(path) or path != p["path"]:
        raise Refused(f"{p['path']} is not a plain absolute path")
    name = os.path.basename(path)
    present = p["state"] == "present"
    marked = {"found": False} if p["marker"] is not None else {}
    mode = int(p["mode"], 8)
    try:
        dir_fd = open_directory(path)
    except FileNotFoundError:
        if module.check_mode or not present:  # a new host: Pod's tree comes with the run
            return {"changed": present, **marked}
        raise
    try:
        original, st = read_existing(dir_fd, name, path, p["max_bytes"])
        if p["marker"] is not None:
            marked["found"] = has_block(original, p["marker"])
            if not present and not marked["found"]:  # nothing to remove: left as it is
                return {"changed": False, **marked}
            wanted = with_block(original, p["marker"], p["block"] or "", present)
        elif present:
            wanted = (p["content"] or "").encode()
        else:
            if original is None:
                return {"changed": False}
            if not module.check_mode:
                os.unlink(name, dir_fd=dir_fd)
            return {"changed": True}
        if p["python"]:
            try:
                compile(wanted, path, "exec", dont_inherit=True)
            except (SyntaxError, ValueError) as error:
                line = getattr(error, "lineno", None)
                module.fail_json(
                    msg=f"{path} would not compile as Python (line {line}): left unchanged"
                )
        uid = pwd.getpwnam(p["owner"]).pw_uid
        gid = grp.getgrnam(p["group"]).gr_gid
        same_content = original == wanted
        same_attrs = st is not None and (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (
            uid,
            gid,
            mode,
        )
        if same_content and same_attrs:
            return {"changed": False, **marked}
        if not module.check_mode:
            write_new(dir_fd, name, wanted, uid, gid, mode)
        return {"changed": True, **marked}
    finally:
        os.close(dir_fd)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "state": {"type": "str", "default": "present", "choices": ["present", "absent"]},
            "content": {"type": "str", "no_log": True},
            "block": {"type": "str", "no_log": True},
            "marker": {"type": "str"},
            "owner": {"type": "str", "required": True},
            "group": {"type": "str", "required": True},
            "mode": {"type": "str", "required": True},
            "python": {"type": "bool", "default": False},
            "max_bytes": {"type": "int", "default": MAX_BYTES},
        },
        mutually_exclusive=[["content", "marker"], ["content", "block"]],
        required_by={"block": ["marker"]},
        supports_check_mode=True,
    )
    try:
        module.exit_json(**run(module))
    except Refused as error:
        module.fail_json(
            msg=f"Refused: {error}: {module.params['path']} is not a plain file on a plain path. "
            "Root will not write through a link, or a file it did not make, that the owner of "
            "the tree could have planted. Nothing was written."
        )
    except TooLarge as error:
        module.fail_json(
            msg=f"Refused: {error}, more than the {module.params['max_bytes']} bytes root reads "
            f"of a file in another user's tree (max_bytes): {module.params['path']} was left "
            "unchanged. Look at what it holds (the tree's owner may have filled it), and bring "
            "it back to a size of its own."
        )
    except (OSError, KeyError) as error:
        module.fail_json(
            msg=f"{module.params['path']} was left unchanged: {type(error).__name__} {error}"
        )


if __name__ == "__main__":
    main()
