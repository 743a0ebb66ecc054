#!/usr/bin/python3
"""Ansible module: give the files one user left in a directory to another user, as new files.

The spool of the bundled worker (one SQLite file per node, with its -wal and -shm files) was
Pod's user's in earlier releases. Changing the owner of those files in place (chown) leaves
Pod's user whatever it opened before: a descriptor kept open on a spool file still reads and
writes the statements after the move. Here each such file is copied into a new file (a new
inode) that root creates in the same directory, owned by the new user from its creation
(fchown, fchmod on the descriptor), its content checked against the old one after the copy
(SHA-256 of both, read again), then renamed over the old name: the old inode leaves the
directory, and a descriptor Pod's user kept reaches nothing the worker reads. Run while the
workers are stopped (no SQLite file is open), after the directory itself was given to the new
user (tasks/migrate_user.yml): Pod's user can then neither add nor replace an entry.

The directory is opened from / one component at a time without following links, every entry
relative to its descriptor without following links, and checked on its descriptor: a regular
file with a single link, named as the worker names its spool's files (WORKER_NAME), no larger
than a node's spool may grow (I(max_mb)), without holes, and all of them fitting in the free
space unprivileged users have (root's reserved blocks are never used). Anything else of the
old user stops the run before anything is copied, naming it; nothing is done by path name
once the directory is open. Nothing is lost: a file whose copy differs from it, or whose copy
fails (a disk error, a size limit), is left as it was, and the run fails naming it.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import os
import pwd
import re
import stat
from typing import Any

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: xapi_spool_move
short_description: Give a directory's files of one user to another, copied into new files
description:
  - Copies each regular file of I(from_user) in I(path) into a new file owned by I(owner)
    and I(group) with I(mode), checks the copy against the original, and renames it over the
    original's name. Files of other users are left alone. A link, a file with several links
    or any other kind of entry of I(from_user), a file not named like the worker's spool
    files, one larger than I(max_mb), one with holes (sparse), or files more than the
    filesystem's free space are refused before anything is copied.
  - In check mode, every check is made and nothing is changed: a look before any change.
  - I(path) must be a directory of I(owner), reached without a symbolic link.
options:
  path: {description: Absolute path of the directory., type: path, required: true}
  from_user: {description: The user whose files move., type: str, required: true}
  owner: {description: Owner of the new files (and of the directory)., type: str, required: true}
  group: {description: Group of the new files., type: str, required: true}
  mode: {description: Mode of the new files (octal string)., type: str, default: "0600"}
  max_mb:
    description: The largest file moved, MiB (a node's spool limit); 0, the worker's automatic
      limit's maximum (10240).
    type: int
    default: 0
"""

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
NEW_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# The new file's name while it is written: a run cut short leaves one, removed by the next.
TEMP_PREFIX = ".xapi-move."
CHUNK = 1 << 20
# The names the worker gives the files of its spool (xapi_worker/src/xapi_worker/spool.py):
# node_file() (the node's name with anything but [A-Za-z0-9@._-] replaced, then .sqlite3),
# SQLite's -wal and -shm, and the suffixes LOCK, CHECK_MARK, CHECKED_MARK, SETTING_ASIDE,
# SET_ASIDE with SET_ASIDE_STAMP (as retention.DAMAGED_STAMP reads it) and SALVAGED. The
# worker is not importable here (its venv is not Ansible's python): tests/test_spool_move.py
# checks this rule against spool.py's own names.
WORKER_NAME = re.compile(
    r"[A-Za-z0-9@._-]+\.sqlite3"
    r"(?:-wal|-shm|\.lock|\.check|\.checked|\.setting-aside"
    r"|\.damaged-[0-9]{8}T[0-9]{6}Z(?:\.salvaged)?(?:-wal|-shm)?)?"
)
# A node's spool limit when the worker computes it (XAPI_WORKER_SPOOL_MAX_MB=0): at most
# spool.AUTO_MAX_BYTES.
AUTO_MAX_MB = 10240


class Refused(Exception):
    """An entry or the directory is not what the move may take: nothing was copied."""


def open_directory(path: str) -> int:
    """A descriptor of ``path``, reached from / one component at a time, none a link."""
    fd = os.open("/", DIR_FLAGS)
    try:
        for part in [p for p in path.split("/") if p]:
            if part in (".", ".."):
                raise Refused(f"{path}: a . or .. component")
            try:
                child = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as error:
                raise Refused(f"{path}: {part} is a link or not a directory ({error})") from error
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def worker_name(name: str) -> bool:
    """Whether ``name`` is one the worker gives a file of its spool (WORKER_NAME)."""
    return WORKER_NAME.fullmatch(name) is not None


def has_holes(fd: int, size: int) -> bool:
    """Whether the file behind ``fd`` has a hole before its end (sparse): its copy would
    write every byte of it. SEEK_HOLE rather than st_blocks, which a compressing filesystem
    (ZFS, btrfs) makes smaller than the size of a file that has no hole."""
    return size > 0 and os.lseek(fd, 0, os.SEEK_HOLE) < size


def digest(fd: int, limit: int) -> str:
    """SHA-256 of the file behind ``fd``, read from its start, at most ``limit`` bytes."""
    found = hashlib.sha256()
    offset = 0
    while offset < limit and (chunk := os.pread(fd, min(CHUNK, limit - offset), offset)):
        found.update(chunk)
        offset += len(chunk)
    return found.hexdigest()


def copy_over(
    dir_fd: int, name: str, src: int, info: os.stat_result, ids: tuple[int, int, int]
) -> None:
    """Copy the file behind ``src`` into a new file of the new owner, check it, rename it
    over ``name``."""
    uid, gid, mode = ids
    temp = TEMP_PREFIX + name
    try:
        new = os.open(temp, NEW_FLAGS, 0o600, dir_fd=dir_fd)
    except OSError as error:
        raise Refused(f"{name}: its copy {temp} cannot be made ({error})") from error
    # At most the size checked (entries_to_move), and one byte more to see it grow: a
    # descriptor Pod's user kept may still write to the old file.
    limit = info.st_size + 1
    try:
        os.fchown(new, uid, gid)
        os.fchmod(new, mode)
        offset = 0
        while offset < limit and (chunk := os.pread(src, min(CHUNK, limit - offset), offset)):
            left = memoryview(chunk)
            while left:  # a write may take less than it is given (a size limit, a signal)
                left = left[os.write(new, left) :]
            offset += len(chunk)
        if offset != info.st_size:
            raise Refused(f"{name} changed while it was copied: left as it was")
        os.fsync(new)
        if digest(new, limit) != digest(src, limit) or os.fstat(src).st_size != offset:
            raise Refused(f"{name} changed while it was copied: left as it was")
        os.utime(new, ns=(info.st_atime_ns, info.st_mtime_ns))
        os.close(new)
        new = -1
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException as error:
        if new >= 0:
            os.close(new)
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=dir_fd)
        if isinstance(error, OSError):
            raise Refused(f"{name}: its copy failed, left as it was ({error})") from error
        raise


def entries_to_move(
    dir_fd: int, from_uid: int, max_bytes: int
) -> list[tuple[str, int, os.stat_result]]:
    """Every entry of the old user, opened and checked; a refused one closes them all.
    One named like the move's own new files is refused: it would never be moved (the move
    due again on every run), or stand where a copy is made. So is one the worker would not
    have made (its name, its size, holes): root would copy whatever Pod's user put there, a
    mistyped spool directory's files, or a sparse file of any size written out whole."""
    found: list[tuple[str, int, os.stat_result]] = []
    try:
        for name in sorted(os.listdir(dir_fd)):
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if info.st_uid != from_uid:
                continue
            if name.startswith(TEMP_PREFIX):
                raise Refused(f"{name}: named like the move's own new files ({TEMP_PREFIX}*)")
            if not stat.S_ISREG(info.st_mode):
                raise Refused(f"{name}: not a regular file")
            if not worker_name(name):
                raise Refused(f"{name}: not named like a file of the worker's spool")
            fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
            found.append((name, fd, os.fstat(fd)))
            opened = found[-1][2]
            if not stat.S_ISREG(opened.st_mode) or opened.st_nlink != 1:
                raise Refused(f"{name}: not a regular file with a single link")
            if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
                raise Refused(f"{name}: replaced while it was looked at")
            if opened.st_size > max_bytes:
                raise Refused(
                    f"{name}: {opened.st_size} bytes, more than a node's spool may hold "
                    f"({max_bytes} bytes)"
                )
            if has_holes(fd, opened.st_size):
                raise Refused(f"{name}: a sparse file (holes), not one the worker wrote")
    except BaseException:
        for _, fd, _ in found:
            os.close(fd)
        raise
    return found


def remove_leftovers(dir_fd: int, uid: int) -> list[str]:
    """New files of a run cut short (root's until given to the new owner): removed. Any
    other entry of that name stops the copy it stands in the way of (copy_over)."""
    removed = []
    for name in os.listdir(dir_fd):
        if name.startswith(TEMP_PREFIX):
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISREG(info.st_mode) and info.st_uid in (0, uid):
                os.unlink(name, dir_fd=dir_fd)
                removed.append(name)
    return removed


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "from_user": {"type": "str", "required": True},
            "owner": {"type": "str", "required": True},
            "group": {"type": "str", "required": True},
            "mode": {"type": "str", "default": "0600"},
            "max_mb": {"type": "int", "default": 0},
        },
        supports_check_mode=True,
    )
    params: dict[str, Any] = module.params
    path = params["path"]
    try:
        from_uid = pwd.getpwnam(params["from_user"]).pw_uid
        mode = int(params["mode"], 8)
    except (KeyError, ValueError) as error:
        module.fail_json(msg=f"xapi_spool_move: {error}")
    try:
        uid = pwd.getpwnam(params["owner"]).pw_uid
        gid = grp.getgrnam(params["group"]).gr_gid
    except KeyError as error:
        # In --check, the run would make the new owner first (it does not exist yet), and
        # the directory would be given to it by the task before this one.
        if not module.check_mode:
            module.fail_json(msg=f"xapi_spool_move: {error}")
        uid = gid = -1
    try:
        dir_fd = open_directory(path)
    except Refused as error:
        module.fail_json(msg=f"Refused: {error}. Nothing was moved.")
    try:
        if not module.check_mode and os.fstat(dir_fd).st_uid != uid:
            module.fail_json(msg=f"Refused: {path} is not {params['owner']}'s. Nothing was moved.")
        max_mb = params["max_mb"] if params["max_mb"] > 0 else AUTO_MAX_MB
        try:
            entries = entries_to_move(dir_fd, from_uid, max_mb * 1024**2)
        except Refused as error:
            module.fail_json(msg=f"Refused: {path}/{error}. Nothing was moved.")
        names = [name for name, _, _ in entries]
        needed = sum(info.st_size for _, _, info in entries)
        disk = os.fstatvfs(dir_fd)
        if needed > disk.f_bavail * disk.f_frsize:
            for _, fd, _ in entries:
                os.close(fd)
            module.fail_json(
                msg=f"Refused: {path}: its files of {params['from_user']} take {needed} bytes, "
                f"more than its filesystem's free space ({disk.f_bavail * disk.f_frsize} bytes, "
                "root's reserve left out). Nothing was moved."
            )
        leftovers = [] if module.check_mode else remove_leftovers(dir_fd, uid)
        moved: list[str] = []
        try:
            for name, fd, info in entries:
                if not module.check_mode:
                    copy_over(dir_fd, name, fd, info, (uid, gid, mode))
                    moved.append(name)
        except Refused as error:
            module.fail_json(
                msg=f"Refused: {path}/{error}. Moved before it: {moved or 'none'}.",
                moved=moved,
            )
        finally:
            for _, fd, _ in entries:
                os.close(fd)
        if moved:
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    module.exit_json(changed=bool(names or leftovers), moved=names, leftovers_removed=leftovers)


if __name__ == "__main__":
    main()
