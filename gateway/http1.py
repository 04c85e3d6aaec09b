"""APIXO's HTTP/1.1 client: keep-alive connections to one host, answers parsed by llhttp.

Why not aiohttp's client, which still delivers the webhooks: its per-request
machinery (request and response objects, header multidicts, the connector's
bookkeeping, timers, trace hooks) was the largest single cost of a cache-miss
submit. In the benchmark's paced load (64 clients, 150 requests/s) a
pass-through proxy on aiohttp's client added 1.28 ms p50 to a request, and
0.74 ms on this one, at 1,068 against 667 µs of CPU per request. Calls to
APIXO are all alike (small JSON bodies, one host, no cookies, redirects or
proxies), so what is left is writing a request and reading its answer.
httptools (llhttp, Node's HTTP parser) reads the answers: chunked bodies,
keep-alive rules and malformed input are its job, not this module's.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
import zlib
from dataclasses import dataclass

import httptools
from yarl import URL

# APIXO's answers are a few KB; anything near this is not an answer to read.
MAX_ANSWER_BYTES = 8 * 1024 * 1024
# An idle connection is dropped after this, as aiohttp's keepalive_timeout does:
# a server that closes it first races the next request sent on it.
IDLE_SECONDS = 15.0


class TransportError(Exception):
    """No whole, readable HTTP answer: refused, reset, cut short or malformed.

    status is the answer's status code when its head arrived before the
    failure: the server had the request and acted on it (a submit it
    answered 200 must not be sent again).
    """

    def __init__(self, detail: str, status: int | None = None) -> None:
        super().__init__(detail)
        self.status = status


class AnswerTimeout(TransportError):
    """The request went out and no whole answer came in time.

    Unlike a request that never left (no connection within the time), the
    server may have it and be acting on it.
    """


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str]  # names in lower case; a repeated header keeps its last value
    body: bytes


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one request at a time, its answer fed to llhttp."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Answer] | None = None
        self._headers: dict[str, str] = {}
        # One bytearray, not a list of chunks: an answer of a million one-byte
        # chunks would otherwise hold a million objects.
        self._body = bytearray()
        self.received = 0
        self._headers_done = False
        self._keep_alive = False
        self._ends_at_eof = False  # no length and not chunked: the body ends with the connection
        self.closed = False
        self.idle_since = 0.0

    # -- asyncio.Protocol --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            # Bytes nobody asked for: this connection's framing is no longer known.
            self.close()
            return
        self.received += len(data)
        if self.received > MAX_ANSWER_BYTES:
            self._fail(TransportError(
                f"the answer is longer than {MAX_ANSWER_BYTES} bytes", self._status()
            ))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(TransportError("the server switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(TransportError(f"malformed HTTP answer: {exc}", self._status()))

    def eof_received(self) -> bool:
        self.closed = True  # no request may be sent on it from now on
        return False  # close; connection_lost() decides what the answer was

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._headers_done and self._ends_at_eof:
            self._finish()
            return
        why = ("the connection was closed before an answer" if self.received == 0
               else "the connection was closed in the middle of the answer")
        waiter.set_exception(TransportError(f"{why}: {exc}" if exc else why, self._status()))

    # -- llhttp callbacks --------------------------------------------------

    def on_message_begin(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            # A second answer to one request.
            self.close()
        self._headers = {}
        self._body = bytearray()
        self._headers_done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._headers_done:
            return  # a chunked body's trailer: it does not override the head
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._headers_done = True
        self._keep_alive = self._parser.should_keep_alive()
        self._ends_at_eof = (
            "content-length" not in self._headers
            and "chunked" not in self._headers.get("transfer-encoding", "").lower()
        )

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        if 100 <= self._parser.get_status_code() < 200:
            # An interim answer (100 Continue); the final one follows, and a
            # connection lost before it is no answer at all.
            self._headers_done = self._ends_at_eof = False
            return
        self._finish()

    # -- the client's side ---------------------------------------------------

    def send(self, request: bytes) -> asyncio.Future[Answer]:
        assert self._transport is not None
        self._waiter = waiter = self._loop.create_future()
        self.received = 0
        self._headers_done = False
        self._transport.write(request)
        return waiter

    def close(self) -> None:
        self.closed = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def abort(self) -> None:
        """Close at once: a connection being thrown away owes its peer no TLS goodbye,
        and a hung peer would otherwise hold its socket for the close's timeout."""
        self.closed = True
        if self._transport is not None:
            self._transport.abort()

    def _status(self) -> int | None:
        return self._parser.get_status_code() if self._headers_done else None

    def _finish(self) -> None:
        waiter = self._waiter
        answer = Answer(self._parser.get_status_code(), self._headers, bytes(self._body))
        self._body = bytearray()
        if not self._keep_alive:
            self.close()
        if waiter is not None and not waiter.done():
            waiter.set_result(answer)

    def _fail(self, exc: TransportError) -> None:
        self.abort()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)


class Client:
    """Requests to one base URL over a pool of keep-alive connections.

    At most `limit` requests are on the wire at once; the others wait for a
    connection. Not safe to share between event loops.
    """

    def __init__(self, base_url: str, *, limit: int, user_agent: str) -> None:
        url = URL(base_url)  # ValueError for what is no URL (a port of 99999, say)
        if url.scheme not in ("http", "https") or not url.raw_host or url.port is None:
            raise ValueError(f"not an http:// or https:// URL with a host: {base_url!r}")
        self._host = url.raw_host
        self._port = url.port
        self._tls = ssl.create_default_context() if url.scheme == "https" else None
        # A fully qualified name's root dot is no part of the name a certificate
        # names (aiohttp drops it too).
        self._tls_name = self._host.rstrip(".") if self._tls else None
        self._prefix = url.raw_path.rstrip("/")
        host = f"[{self._host}]" if ":" in self._host else self._host
        if not url.is_default_port():
            host = f"{host}:{self._port}"
        self._head = (
            f"Host: {host}\r\nUser-Agent: {user_agent}\r\n"
            "Accept: application/json\r\nAccept-Encoding: identity\r\n"
        )
        self._idle: collections.deque[_Connection] = collections.deque()
        self._busy: set[_Connection] = set()
        self._slots = asyncio.Semaphore(limit)
        self._closed = False

    async def request(
        self, method: str, target: str, *, headers: str = "", body: bytes | None = None,
        # Not left to the caller's asyncio.timeout: only here is it known whether
        # the request had gone out when the time ran out.
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Answer:
        """One request. target: the path under the base URL, with its query, already
        percent-encoded; headers: more header lines, each ending in CRLF; timeout:
        seconds for all of it, from waiting for a connection to the last byte.

        Raises TransportError when no whole answer arrives, AnswerTimeout when
        the time ran out after the request went out. A caller that gives up
        closes the connection: its answer may still be on the way.
        Only GET and POST: llhttp reads an answer to HEAD as if it had a body.
        """
        if method not in ("GET", "POST"):
            raise ValueError(f"unsupported method {method}")
        head = f"{method} {self._prefix}{target} HTTP/1.1\r\n{self._head}{headers}"
        if body is not None:
            head += f"Content-Length: {len(body)}\r\n"
        request = (head + "\r\n").encode("latin-1")
        if body:
            request += body
        sent = [False]
        try:
            async with asyncio.timeout(timeout):
                return await self._request(method, request, sent)
        except TimeoutError:
            if sent[0]:
                raise AnswerTimeout(f"no answer within {timeout:g} s") from None
            raise TransportError(f"no connection to send it on within {timeout:g} s") from None

    async def _request(self, method: str, request: bytes, sent: list[bool]) -> Answer:
        """request(); sent[0] becomes True once the request is on its way."""
        async with self._slots:
            self._check_open()
            conn = self._take_idle()
            if conn is not None and method == "GET":
                sent[0] = True
                try:
                    return await self._send(conn, request)
                except TransportError:
                    if conn.received:
                        raise
                # A reused connection the server closed just as the request went
                # out: nothing was read, and a GET can be sent again. A POST could
                # have been acted on, so it fails like any lost answer.
                conn = None
            if conn is None:
                self._check_open()
                conn = await self._connect()
            sent[0] = True
            return await self._send(conn, request)

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError("the client is closed")

    async def _send(self, conn: _Connection, request: bytes) -> Answer:
        self._busy.add(conn)
        answered = False
        try:
            answer = await conn.send(request)
            answered = True
        finally:
            self._busy.discard(conn)
            if answered and not conn.closed and not self._closed:
                conn.idle_since = time.monotonic()
                self._idle.append(conn)
            elif answered:
                conn.close()
            else:
                conn.abort()  # its answer may still be on the way
        return _decoded(answer)

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        # Oldest first from the left: those past IDLE_SECONDS go before a reuse.
        while self._idle and (self._idle[0].closed
                              or now - self._idle[0].idle_since > IDLE_SECONDS):
            self._idle.popleft().close()
        while self._idle:
            conn = self._idle.pop()  # the most recent: the likeliest still open
            if not conn.closed:
                return conn
            conn.close()
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(
                lambda: _Connection(loop), self._host, self._port, ssl=self._tls,
                server_hostname=self._tls_name,
                # Happy eyeballs, as aiohttp: an address that drops the connect
                # (a broken IPv6 route, a dead node behind DNS) costs 250 ms,
                # not the whole request timeout.
                happy_eyeballs_delay=0.25, interleave=1,
            )
        except OSError as exc:  # refused, unreachable, DNS, TLS (ssl.SSLError is one)
            raise TransportError(
                f"cannot connect to {self._host}:{self._port}: {type(exc).__name__}: {exc}"
            ) from exc
        return conn

    async def close(self) -> None:
        self._closed = True
        for conn in (*self._idle, *self._busy):
            conn.close()
        self._idle.clear()
        self._busy.clear()
        # Let the transports run their connection_lost() before the loop goes.
        await asyncio.sleep(0)


def _decoded(answer: Answer) -> Answer:
    """The body without its Content-Encoding: identity is asked for, not always given."""
    encoding = answer.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return answer
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise TransportError(
            f"the answer has an unsupported Content-Encoding {encoding!r}", answer.status
        )
    # wbits 47 reads a gzip or a zlib header; "deflate" is sometimes sent raw (-15).
    for wbits in (47, -15):
        inflater = zlib.decompressobj(wbits)
        try:
            body = inflater.decompress(answer.body, MAX_ANSWER_BYTES)
        except zlib.error:
            continue
        if inflater.unconsumed_tail:
            raise TransportError(
                f"the answer inflates past {MAX_ANSWER_BYTES} bytes", answer.status
            )
        if not inflater.eof:
            raise TransportError(f"the answer's {encoding} body is cut short", answer.status)
        return Answer(answer.status, answer.headers, body)
    raise TransportError(f"the answer's {encoding} body cannot be inflated", answer.status)
