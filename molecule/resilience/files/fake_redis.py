"""A listener a local user (`pod`) starts on Pod's Redis port while Pod's Redis is down: it
answers like a Redis that wants a password (NOAUTH), refuses every AUTH or accepts it
(`accept`), and appends every byte it receives to a file. Argv: port, capture file, mode."""

from __future__ import annotations

import socket
import sys
import threading


def talk(conn: socket.socket, capture: str, accept: bool) -> None:
    authed = False
    with conn:
        while data := conn.recv(65536):
            with open(capture, "ab") as out:
                out.write(data)
            upper = data.upper()
            if b"AUTH" in upper:
                authed = accept
                conn.sendall(b"+OK\r\n" if accept else b"-WRONGPASS invalid password\r\n")
            elif authed:
                conn.sendall(b":1\r\n" if b"EXISTS" in upper else b"+OK\r\n")
            else:
                conn.sendall(b"-NOAUTH Authentication required.\r\n")


def main() -> None:
    port, capture, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    server = socket.create_server(("127.0.0.1", port))
    open(capture, "wb").close()
    print("listening", flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=talk, args=(conn, capture, mode == "accept"), daemon=True).start()


if __name__ == "__main__":
    main()
