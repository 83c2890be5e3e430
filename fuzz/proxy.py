#!/usr/bin/env python3
"""A TCP relay that records what each client sends: make-seeds.sh puts it
between libnbd's tools and upstream nbdkit to record real handshakes and
requests. Usage: proxy.py LISTEN_PORT SERVER_PORT OUT_PREFIX (connection N
is saved as OUT_PREFIX-N.bin when it closes)."""
import socket
import sys
import threading

listen_port, server_port, prefix = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]


def pump(src, dst, log):
    while True:
        b = src.recv(65536)
        if not b:
            break
        if log is not None:
            log.extend(b)
        dst.sendall(b)
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def relay(n, c):
    s = socket.create_connection(("127.0.0.1", server_port))
    log = bytearray()
    up = threading.Thread(target=pump, args=(c, s, log))
    up.start()
    pump(s, c, None)
    up.join()
    with open(f"{prefix}-{n}.bin", "wb") as f:
        f.write(log)
    c.close()
    s.close()


ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", listen_port))
ls.listen()
n = 0
while True:
    c, _ = ls.accept()
    n += 1
    threading.Thread(target=relay, args=(n, c), daemon=True).start()
