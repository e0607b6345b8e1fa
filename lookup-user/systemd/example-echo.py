#!/usr/bin/python3
"""Echo server for example-echo.socket: systemd passes the sockets.

Answers every TCP connection and UDP datagram with "echo: " and what it got,
so a client can tell which service answered. Standard library only.

UDP replies go out from the socket's own address (127.0.0.1:8007). A client
that connects its UDP socket to the steered address drops them; such a
service would read IP_ORIGDSTADDR and answer with IP_PKTINFO.
"""

import os
import selectors
import socket

LISTEN_FDS_START = 3


def passed_sockets():
    """The sockets systemd passed (sd_listen_fds)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        raise SystemExit("no sockets passed: start example-echo.socket, not this service")
    count = int(os.environ.get("LISTEN_FDS", "0"))
    return [socket.socket(fileno=fd) for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + count)]


def main():
    selector = selectors.DefaultSelector()
    for sock in passed_sockets():
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            sock = key.fileobj
            try:
                if sock.type == socket.SOCK_STREAM:
                    conn, _ = sock.accept()
                    with conn:
                        conn.settimeout(5)
                        conn.sendall(b"echo: " + conn.recv(4096))
                else:
                    data, peer = sock.recvfrom(4096)
                    sock.sendto(b"echo: " + data, peer)
            except OSError:
                # One bad client must not stop the others.
                pass


if __name__ == "__main__":
    main()
