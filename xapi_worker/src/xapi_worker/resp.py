"""A small Redis client: RESP2 over one socket, with AUTH (user and password), TLS verified
against a CA, a timeout per connection and per read. For the tools that run where redis-py
is not installed: ``check_xapi`` (check/) and the frontal's broker check
(roles/xapi_frontal/files/xapi_frontal_broker_check.py, which receives this file's source).

Standard library only, and no import from the package: the frontal's check runs this source
alone with the system's Python.
"""

from __future__ import annotations

import socket
import ssl

#: Longest RESP reply line or bulk string accepted (a runaway reply is an error).
MAX_BULK = 64 * 1024 * 1024


class ReplyError(Exception):
    """An error reply of the server (``-ERR ...``, ``-WRONGPASS ...``)."""

    @property
    def code(self) -> str:
        return str(self).split(" ", 1)[0]


class ProtocolError(Exception):
    """Not a RESP2 answer, or the connection closed mid-reply (``closed``)."""

    def __init__(self, message: str, closed: bool = False) -> None:
        super().__init__(message)
        self.closed = closed


Reply = None | int | bytes | str | list["Reply"]


class Connection:
    """One connection, one command at a time. ``login`` authenticates and selects the
    database; the socket, TLS and every read are bounded by ``timeout`` seconds."""

    def __init__(
        self, host: str, port: int, timeout: float, tls: bool = False, ca: str = ""
    ) -> None:
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            sock.settimeout(timeout)
            if tls:
                context = ssl.create_default_context(cafile=ca or None)
                sock = context.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._file = sock.makefile("rb")

    def login(self, user: str, password: str, db: int) -> None:
        """AUTH (with the user when one is given; none without a password), then SELECT."""
        if password:
            if user:
                self.call("AUTH", user, password)
            else:
                self.call("AUTH", password)
        self.call("SELECT", str(db))

    def close(self) -> None:
        try:
            self._file.close()
        finally:
            self._sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def call(self, *args: str) -> Reply:
        out = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg.encode()
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self._sock.sendall(b"".join(out))
        return self._read()

    def _line(self) -> bytes:
        line = self._file.readline(MAX_BULK)
        if not line.endswith(b"\r\n"):
            closed = len(line) < MAX_BULK
            raise ProtocolError(
                "connection closed by the server" if closed else "reply line too long", closed
            )
        return line[:-2]

    def _read(self) -> Reply:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode("utf-8", "replace")
        if kind == b"-":
            raise ReplyError(rest.decode("utf-8", "replace"))
        try:
            number = int(rest)
        except ValueError:
            raise ProtocolError("not a RESP2 reply") from None
        if kind == b":":
            return number
        if kind == b"$":
            if number < 0:
                return None
            if number > MAX_BULK:
                raise ProtocolError("bulk reply too large")
            data = self._file.read(number + 2)
            if len(data) != number + 2 or not data.endswith(b"\r\n"):
                raise ProtocolError("connection closed mid-reply", closed=len(data) < number + 2)
            return data[:-2]
        if kind == b"*":
            if number < 0:
                return None
            return [self._read() for _ in range(number)]
        raise ProtocolError("not a RESP2 reply")

    def integer(self, *args: str) -> int:
        reply = self.call(*args)
        if not isinstance(reply, int):
            raise ProtocolError(f"{args[0]} did not answer an integer")
        return reply

    def bulk(self, *args: str) -> bytes | None:
        reply = self.call(*args)
        if reply is not None and not isinstance(reply, bytes):
            raise ProtocolError(f"{args[0]} did not answer a bulk string")
        return reply

    def bulks(self, *args: str) -> list[bytes]:
        reply = self.call(*args)
        if not isinstance(reply, list) or not all(isinstance(r, bytes) for r in reply):
            raise ProtocolError(f"{args[0]} did not answer a list of strings")
        return [r for r in reply if isinstance(r, bytes)]


def pairs(flat: list[bytes]) -> dict[str, bytes]:
    """An HGETALL reply as {field: value}."""
    return {flat[i].decode("utf-8", "replace"): flat[i + 1] for i in range(0, len(flat) - 1, 2)}
