"""The APIXO client's HTTP/1.1 layer against real servers on loopback.

The servers here are raw asyncio sockets that answer exactly the bytes each
test gives them: the framings, keep-alive rules, cut connections and malformed
answers that a well-behaved aiohttp server (the simulator) never sends.
"""

from __future__ import annotations

import asyncio
import gzip
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme

from gateway.http1 import MAX_ANSWER_BYTES, Answer, AnswerTimeout, Client, TransportError

# Given the request's bytes, what to write back; None closes without a word.
Respond = Callable[[bytes], bytes | None]


def answer(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return f"HTTP/1.1 {status}\r\n{head}\r\n".encode() + body


def sized(body: bytes, *headers: str) -> bytes:
    return answer(body, f"Content-Length: {len(body)}", *headers)


@dataclass
class Server:
    url: str
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    open_now: int = 0
    most_open: int = 0


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + await reader.readexactly(length)


@asynccontextmanager
async def raw_server(
    respond: Respond, *, close_after: bool = False, delay: float = 0.0,
    tls: ssl.SSLContext | None = None,
) -> AsyncIterator[Server]:
    """Answers each request on a connection with respond(request); close_after
    closes every connection after its first answer, without saying so (a reply
    that says Connection: close is followed by a close anyway)."""
    server = Server("")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server.connections += 1
        server.open_now += 1
        server.most_open = max(server.most_open, server.open_now)
        try:
            while True:
                try:
                    request = await read_request(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                server.requests.append(request)
                await asyncio.sleep(delay)
                reply = respond(request)
                if reply is None:
                    return
                writer.write(reply)
                await writer.drain()
                if close_after or b"Connection: close" in reply:
                    return
        finally:
            server.open_now -= 1
            writer.close()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls)
    port = listener.sockets[0].getsockname()[1]
    server.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/api/v1"
    try:
        yield server
    finally:
        listener.close()


@asynccontextmanager
async def client_for(url: str, limit: int = 10) -> AsyncIterator[Client]:
    client = Client(url, limit=limit, user_agent="test")
    try:
        yield client
    finally:
        await client.close()


async def get(client: Client, target: str = "/statusTask/m?taskId=1") -> Answer:
    async with asyncio.timeout(5):
        return await client.request("GET", target)


@pytest.mark.parametrize(("reply", "headers"), [
    (sized(b'{"a": 1}', "Retry-After: 3"), {"retry-after": "3"}),
    (answer(b'5\r\n{"a":\r\n3\r\n 1}\r\n0\r\n\r\n', "Transfer-Encoding: chunked"), {}),
    # No length and not chunked: the body ends when the server closes.
    (answer(b'{"a": 1}', "Connection: close"), {}),
    # An interim answer first: the final one is what counts.
    (answer(b"", status="100 Continue") + sized(b'{"a": 1}'), {}),
    (sized(gzip.compress(b'{"a": 1}'), "Content-Encoding: gzip"), {}),
], ids=["content-length", "chunked", "until-close", "100-continue", "gzip"])
async def test_an_answer_is_read_whatever_its_framing(
    reply: bytes, headers: dict[str, str]
) -> None:
    async with raw_server(lambda _: reply) as server, client_for(server.url) as client:
        got = await get(client)
    assert (got.status, got.body) == (200, b'{"a": 1}')
    assert headers.items() <= got.headers.items()


async def test_the_request_carries_the_base_path_host_headers_and_body() -> None:
    async with raw_server(lambda _: sized(b"{}")) as server, client_for(server.url) as client:
        async with asyncio.timeout(5):
            await client.request("POST", "/generateTask/grok-image", body=b'{"x": 1}',
                                 headers="Authorization: Bearer k\r\n")
    (request,) = server.requests
    port = server.url.split(":")[2].split("/")[0]
    assert request.startswith(b"POST /api/v1/generateTask/grok-image HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{port}\r\n".encode() in request
    assert b"Authorization: Bearer k\r\n" in request
    assert b"Content-Length: 8\r\n" in request
    assert request.endswith(b'\r\n\r\n{"x": 1}')


async def test_a_keep_alive_connection_is_reused_and_connection_close_obeyed() -> None:
    async with raw_server(lambda _: sized(b"{}")) as server, client_for(server.url) as client:
        for _ in range(5):
            assert (await get(client)).status == 200
        assert server.connections == 1
    async with raw_server(lambda _: sized(b"{}", "Connection: close")) as server, \
            client_for(server.url) as client:
        for _ in range(3):
            assert (await get(client)).status == 200
        assert server.connections == 3


async def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    async with raw_server(lambda _: sized(b"{}"), close_after=True) as server, \
            client_for(server.url) as client:
        for _ in range(3):
            assert (await get(client)).status == 200
            await asyncio.sleep(0.05)  # the close reaches the client
        assert server.connections == 3


async def test_a_get_on_a_connection_closed_under_it_is_sent_again() -> None:
    """The server closes each connection after answering, and the next request may
    go out before the client has seen the close: a GET is then sent once more."""
    async with raw_server(lambda _: sized(b"{}"), close_after=True) as server, \
            client_for(server.url) as client:
        for _ in range(5):
            assert (await get(client)).status == 200
        assert server.connections == 5


@pytest.mark.parametrize(("reply", "needle"), [
    (None, "closed before an answer"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{\"cut", "middle of the answer"),
    (b"HTTP/1.1 200 OK\r\nContent-Le", "middle of the answer"),
    (b"<html>not http</html>\r\n\r\n", "malformed HTTP answer"),
    (sized(b"x", "Content-Encoding: br"), "unsupported Content-Encoding"),
    (sized(b"not gzip", "Content-Encoding: gzip"), "cannot be inflated"),
    (sized(gzip.compress(bytes(range(256)) * 4)[:200], "Content-Encoding: gzip"), "cut short"),
    # An interim answer, then nothing: no final answer came.
    (answer(b"", status="103 Early Hints"), "closed in the middle"),
], ids=["no-answer", "cut-body", "cut-head", "not-http", "brotli", "bad-gzip", "cut-gzip",
        "interim-only"])
async def test_no_whole_answer_is_a_transport_error(reply: bytes | None, needle: str) -> None:
    def respond(_: bytes) -> bytes | None:
        return reply

    async with raw_server(respond, close_after=True) as server, client_for(server.url) as client:
        with pytest.raises(TransportError, match=needle):
            await get(client)
        # The client is still usable: the broken connection is gone.
        with pytest.raises(TransportError):
            await get(client)
        assert server.connections == 2


@pytest.mark.parametrize(("reply", "status"), [
    (None, None),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{\"cut", 200),
    (b"HTTP/1.1 503 Busy\r\nContent-Length: 50\r\n\r\n{\"cut", 503),
    (sized(b"x", "Content-Encoding: br"), 200),
], ids=["no-answer", "cut-200", "cut-503", "brotli-200"])
async def test_a_transport_error_says_whether_the_server_had_answered(
    reply: bytes | None, status: int | None
) -> None:
    """A status that arrived means the server acted on the request: a submit must not
    be sent again (see Upstream.submit)."""
    async with raw_server(lambda _: reply, close_after=True) as server, \
            client_for(server.url) as client:
        with pytest.raises(TransportError) as caught:
            await get(client)
    assert caught.value.status == status


async def test_trailers_do_not_override_the_head_and_tiny_chunks_are_read_whole() -> None:
    chunks = b"".join(b"1\r\n" + bytes([c]) + b"\r\n" for c in b'{"a": 1}')
    reply = answer(chunks + b"0\r\nRetry-After: 99\r\n\r\n", "Transfer-Encoding: chunked",
                   "Retry-After: 1", "Trailer: Retry-After")
    async with raw_server(lambda _: reply) as server, client_for(server.url) as client:
        got = await get(client)
    assert (got.body, got.headers["retry-after"]) == (b'{"a": 1}', "1")


async def test_a_closed_client_sends_nothing_more() -> None:
    async with raw_server(lambda _: sized(b"{}"), delay=0.2) as server:
        client = Client(server.url, limit=4, user_agent="test")
        in_flight = asyncio.ensure_future(get(client))
        await asyncio.sleep(0.05)
        await client.close()
        with pytest.raises(TransportError):
            await in_flight
        with pytest.raises(TransportError, match="closed"):
            await get(client)
        await asyncio.sleep(0.3)
        assert server.connections == 1
        assert server.open_now == 0


async def test_only_get_and_post_are_sent() -> None:
    async with raw_server(lambda _: sized(b"{}")) as server, client_for(server.url) as client:
        with pytest.raises(ValueError, match="HEAD"):
            await client.request("HEAD", "/x")
    assert server.requests == []


async def test_an_oversized_answer_is_refused() -> None:
    huge = answer(b"x" * (MAX_ANSWER_BYTES + 1), "Connection: close")
    async with raw_server(lambda _: huge) as server, client_for(server.url) as client:
        with pytest.raises(TransportError, match="longer than"):
            await get(client)


async def test_a_caller_that_gives_up_does_not_get_a_late_answer_next_time() -> None:
    """A timed-out request's answer may still come; its connection is closed, so the
    next request can never read that answer as its own."""
    answers = iter([b'{"late": 1}', b'{"fresh": 1}'])

    async with raw_server(lambda _: sized(next(answers)), delay=0.3) as server, \
            client_for(server.url) as client:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await client.request("GET", "/a")
        assert (await get(client)).body == b'{"fresh": 1}'
        assert server.connections == 2


async def test_a_request_that_went_out_and_got_no_answer_in_time_is_an_answer_timeout(
) -> None:
    answers = iter([b'{"late": 1}', b'{"fresh": 1}'])
    async with raw_server(lambda _: sized(next(answers)), delay=0.3) as server, \
            client_for(server.url) as client:
        with pytest.raises(AnswerTimeout, match=r"no answer within 0\.1 s"):
            await client.request("POST", "/generateTask/m", body=b"{}", timeout=0.1)
        assert len(server.requests) == 1  # it had gone out
        fresh = await client.request("GET", "/a", timeout=2)
        assert fresh.body == b'{"fresh": 1}'


async def test_time_spent_waiting_for_a_connection_is_not_an_answer_timeout() -> None:
    async with raw_server(lambda _: sized(b"{}"), delay=0.5) as server, \
            client_for(server.url, limit=1) as client:
        busy = asyncio.create_task(client.request("GET", "/slow"))
        await asyncio.sleep(0.05)  # the one connection is taken
        with pytest.raises(TransportError, match="no connection to send it on") as caught:
            await client.request("POST", "/generateTask/m", body=b"{}", timeout=0.1)
        assert not isinstance(caught.value, AnswerTimeout)
        await busy
        assert [r.split(b" ")[1] for r in server.requests] == [b"/api/v1/slow"]


async def test_no_more_than_limit_connections_are_open_at_once() -> None:
    async with raw_server(lambda _: sized(b"{}"), delay=0.05) as server, \
            client_for(server.url, limit=2) as client:
        answers = await asyncio.gather(*(get(client) for _ in range(6)))
    assert [a.status for a in answers] == [200] * 6
    assert server.most_open == 2
    assert server.connections == 2


async def test_nothing_listening_is_a_transport_error() -> None:
    async with raw_server(lambda _: None) as server:
        url = server.url
    async with client_for(url) as client:
        with pytest.raises(TransportError, match="cannot connect"):
            await get(client)


@pytest.fixture
def private_ca(tmp_path: Path) -> tuple[trustme.CA, Path]:
    """A CA no default trust store knows, and its certificate as a PEM file."""
    ca = trustme.CA()
    pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    return ca, pem


async def test_https_verifies_the_certificate(
    private_ca: tuple[trustme.CA, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, pem = private_ca
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(tls)
    async with raw_server(lambda _: sized(b'{"tls": 1}'), tls=tls) as server:
        async with client_for(server.url) as client:
            with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED"):
                await get(client)
        # Trusted the way an operator trusts a private CA: OpenSSL's SSL_CERT_FILE.
        monkeypatch.setenv("SSL_CERT_FILE", str(pem))
        async with client_for(server.url) as client:
            assert (await get(client)).body == b'{"tls": 1}'
