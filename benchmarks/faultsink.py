"""A minimal SMTP sink that defers some recipients: the faulty smarthost of scenario (f).

Postfix's ``smtp-sink`` can reject *every* RCPT (``-r RCPT``) but not half of them, so
scenario (f) uses this asyncio sink instead.  It answers ``451 4.3.0`` to every RCPT
whose local part contains ``--defer-marker`` (default ``defer``) and ``250`` to every
other one; the benchmark sends half of its messages to ``defer@y.bench`` and half to
``b@y.bench``, so exactly half of the messages are refused, on every attempt (a retry
is refused again, deterministically, so it never counts as a delivery).

It speaks just enough ESMTP for a relay: EHLO/HELO (advertising PIPELINING, 8BITMIME,
SIZE and ENHANCEDSTATUSCODES), MAIL, RCPT, DATA (``554`` when no recipient was
accepted), RSET, NOOP and QUIT; commands may be pipelined.  Messages are thrown away.

Counters go to stdout, one line at most every 20 ms while they change, and once more on
SIGTERM/SIGINT before it exits::

    msgs=120 rcpts=120 deferred=118 dups=0 noid=0 sessions=14

``msgs`` counts completed DATA transactions, ``rcpts`` the recipients accepted in them,
``deferred`` the RCPTs answered 451, ``dups`` the messages whose relay queue id (from the
topmost ``Received:`` header, written by relaygw or Postfix) was seen before, and ``noid``
the messages without such an id.

Usage: ``python faultsink.py --port PORT [--defer-marker defer]`` (listens on 127.0.0.1).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys

_RELAY_ID = re.compile(rb"\((?:relaygw|Postfix)\) with \S+ id (\w+)")
_END = b"\r\n.\r\n"


class Stats:
    def __init__(self) -> None:
        self.msgs = 0
        self.rcpts = 0
        self.deferred = 0
        self.dups = 0
        self.noid = 0
        self.sessions = 0
        self.ids: set[bytes] = set()

    def line(self) -> str:
        return (f"msgs={self.msgs} rcpts={self.rcpts} deferred={self.deferred} "
                f"dups={self.dups} noid={self.noid} sessions={self.sessions}")

    def message(self, head: bytes, rcpts: int) -> None:
        self.msgs += 1
        self.rcpts += rcpts
        m = _RELAY_ID.search(head)
        if m is None:
            self.noid += 1
        elif m.group(1) in self.ids:
            self.dups += 1
        else:
            self.ids.add(m.group(1))


class SinkProtocol(asyncio.Protocol):
    def __init__(self, stats: Stats, marker: bytes) -> None:
        self.stats = stats
        self.marker = marker
        self.buf = b""
        self.in_data = False
        self.head = b""
        self.rcpts = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.stats.sessions += 1
        self.transport.write(b"220 faultsink.bench ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out: list[bytes] = []
        while self.buf:
            if self.in_data:
                if not self.head:
                    self.head = self.buf[:2048]
                end = self.buf.find(_END)
                if end < 0:
                    # Keep only what may hold the start of the terminator.
                    self.buf = self.buf[-4:]
                    break
                self.buf = self.buf[end + len(_END):]
                self.in_data = False
                self.stats.message(self.head, self.rcpts)
                self.head = b""
                self.rcpts = 0
                out.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            nl = self.buf.find(b"\r\n")
            if nl < 0:
                break
            line, self.buf = self.buf[:nl], self.buf[nl + 2:]
            reply = self.command(line)
            if reply is None:  # QUIT
                out.append(b"221 2.0.0 Bye\r\n")
                assert self.transport is not None
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            out.append(reply)
        if out:
            assert self.transport is not None
            self.transport.write(b"".join(out))

    def command(self, line: bytes) -> bytes | None:
        verb = line[:4].upper()
        if verb == b"EHLO":
            return (b"250-faultsink.bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                    b"250-SIZE 209715200\r\n250 ENHANCEDSTATUSCODES\r\n")
        if verb == b"HELO":
            return b"250 faultsink.bench\r\n"
        if verb == b"MAIL":
            self.rcpts = 0
            return b"250 2.1.0 Ok\r\n"
        if verb == b"RCPT":
            address = line[8:].split(b">", 1)[0].lower()
            if self.marker in address.split(b"@", 1)[0]:
                self.stats.deferred += 1
                return b"451 4.3.0 Try again later (benchmark fault)\r\n"
            self.rcpts += 1
            return b"250 2.1.5 Ok\r\n"
        if verb == b"DATA":
            if not self.rcpts:
                return b"554 5.5.1 No valid recipients\r\n"
            self.in_data = True
            self.head = b""
            return b"354 End data with <CR><LF>.<CR><LF>\r\n"
        if verb == b"RSET":
            self.rcpts = 0
            return b"250 2.0.0 Ok\r\n"
        if verb == b"NOOP":
            return b"250 2.0.0 Ok\r\n"
        if verb == b"QUIT":
            return None
        return b"502 5.5.2 Command not implemented\r\n"


async def main(port: int, marker: str) -> None:
    stats = Stats()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SinkProtocol(stats, marker.encode()),
                                      "127.0.0.1", port, backlog=1024, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    last = ""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), 0.02)
        except TimeoutError:
            pass
        line = stats.line()
        if line != last:
            print(line, flush=True)
            last = line
    server.close()
    print(stats.line(), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--defer-marker", default="defer")
    args = parser.parse_args()
    try:
        asyncio.run(main(args.port, args.defer_marker))
    except KeyboardInterrupt:
        sys.exit(0)
