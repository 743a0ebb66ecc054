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
file with a single link. Anything else of the old user stops the run, naming it; nothing is
done by path name once the directory is open. Nothing is lost: a file whose copy differs from
it is left as it was, and the run fails naming it.
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
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
    or any other kind of entry of I(from_user) is refused before anything is copied.
  - I(path) must be a directory of I(owner), reached without a symbolic link.
options:
  path: {description: Absolute path of the directory., type: path, required: true}
  from_user: {description: The user whose files move., type: str, required: true}
  owner: {description: Owner of the new files (and of the directory)., type: str, required: true}
  group: {description: Group of the new files., type: str, required: true}
  mode: {description: Mode of the new files (octal string)., type: str, default: "0600"}
"""

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
NEW_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# The new file's name while it is written: a run cut short leaves one, removed by the next.
TEMP_PREFIX = ".xapi-move."
CHUNK = 1 << 20


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


def digest(fd: int) -> str:
    """SHA-256 of the whole file behind ``fd``, read from its start."""
    found = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, CHUNK, offset):
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
    try:
        os.fchown(new, uid, gid)
        os.fchmod(new, mode)
        offset = 0
        while chunk := os.pread(src, CHUNK, offset):
            os.write(new, chunk)
            offset += len(chunk)
        os.fsync(new)
        if digest(new) != digest(src) or os.fstat(src).st_size != offset:
            raise Refused(f"{name} changed while it was copied: left as it was")
        os.utime(new, ns=(info.st_atime_ns, info.st_mtime_ns))
    except BaseException:
        os.close(new)
        os.unlink(temp, dir_fd=dir_fd)
        raise
    os.close(new)
    os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def entries_to_move(dir_fd: int, from_uid: int) -> list[tuple[str, int, os.stat_result]]:
    """Every entry of the old user, opened and checked; a refused one closes them all.
    One named like the move's own new files is refused: it would never be moved (the move
    due again on every run), or stand where a copy is made."""
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
            fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
            found.append((name, fd, os.fstat(fd)))
            opened = found[-1][2]
            if not stat.S_ISREG(opened.st_mode) or opened.st_nlink != 1:
                raise Refused(f"{name}: not a regular file with a single link")
            if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
                raise Refused(f"{name}: replaced while it was looked at")
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
        try:
            entries = entries_to_move(dir_fd, from_uid)
        except Refused as error:
            module.fail_json(msg=f"Refused: {path}/{error}. Nothing was moved.")
        names = [name for name, _, _ in entries]
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
