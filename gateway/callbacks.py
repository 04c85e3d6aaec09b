"""Webhook delivery: a durable outbox, signed POSTs, retries with backoff, SSRF refusal.

The store writes an outbox row in the same transaction that makes a task final,
so a delivery survives any crash. One background loop sends the rows that are
due and records each attempt: delivered after a 2xx, retried later with
exponential backoff otherwise, given up after `callbacks.max_attempts`.

A callback URL is checked when the task is submitted and again before every
attempt, since DNS answers can change. The POST then goes to the very address
that passed the check (the hostname is kept for the Host header, SNI and
certificate checks), so a rebinding DNS server cannot swap in an internal
address between the check and the connection. Redirects are never followed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from yarl import URL

from gateway.config import CallbacksConfig
from gateway.errors import APIError
from gateway.metrics import Metrics
from gateway.store import OutboxItem, Store, TaskRecord
from gateway.tasks import now_ms, status_envelope

log = logging.getLogger("gateway.callbacks")

# APIXO gives a receiver 30 s to answer; one written for APIXO must not see
# its slow-but-valid answers counted as failures and delivered again.
ATTEMPT_TIMEOUT_SECONDS = 30.0
# At shutdown an attempt gets at most this long; one cut short is not recorded,
# so its row stays pending and the next start delivers it again.
SHUTDOWN_GRACE_SECONDS = 5.0
BACKOFF_BASE_SECONDS = 1.0
BACKOFF_CAP_SECONDS = 300.0
RESOLVE_TIMEOUT_SECONDS = 5.0
CONCURRENCY = 16
# Attempts in flight to one host at most: a receiver that accepts connections
# and never answers holds its slots for a whole attempt timeout, and without a
# cap it held all of them, so every other team's webhooks waited behind it.
PER_HOST = 4
# Due rows read per scan: enough to find other hosts' rows behind a slow one's.
SCAN_ROWS = 1000
# Rows another process may have written are noticed at least this often.
IDLE_POLL_SECONDS = 15.0
# After an unexpected error (e.g. the database is unavailable), before trying again.
ERROR_PAUSE_SECONDS = 1.0
SIGNATURE_TOLERANCE_SECONDS = 300
MAX_ERROR_CHARS = 300
USER_AGENT = "apixo-gateway-webhooks/1"
_FAR_FUTURE_MS = 2**62

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# -- signatures ---------------------------------------------------------------


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The X-Gateway-Signature value: t=<unix>,v1=<hex hmac-sha256(secret, t + "." + body)>."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify_signature(
    secret: str,
    header: str,
    body: bytes,
    tolerance_s: int = SIGNATURE_TOLERANCE_SECONDS,
    *,
    now: float | None = None,
) -> bool:
    """True if `header` signs exactly `body` with `secret`, made within tolerance_s of now.

    Several v1 entries are accepted (any match), so a sender can sign with an
    old and a new secret while receivers rotate.
    """
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                return False
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body).rpartition("v1=")[2]
    return any(hmac.compare_digest(expected, c) for c in candidates)


# -- URL checks -----------------------------------------------------------------


def _refused(reason: str) -> APIError:
    return APIError(400, f"callback_url: {reason}", reason="invalid")


def _forbidden(ip: IPAddress) -> str | None:
    """Why the gateway must not connect to ip ("a loopback address"), or None if public."""
    if isinstance(ip, ipaddress.IPv6Address):
        # IPv4-mapped, 6to4 and Teredo addresses reach the IPv4 address they carry.
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            why = _forbidden(embedded)
            return f"an IPv6 form of {embedded}, {why}" if why else None
    checks = (
        (ip.is_unspecified, "an unspecified"),
        (ip.is_loopback, "a loopback"),
        (ip.is_link_local, "a link-local"),
        (ip.is_multicast, "a multicast"),
        (ip.is_private, "a private"),
        (ip.is_reserved, "a reserved"),
        (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local, "a site-local"),
        (not ip.is_global, "a non-public"),
    )
    for hit, kind in checks:
        if hit:
            return f"{kind} address"
    return None


def _host_of(url: str) -> str | None:
    try:
        return URL(url).host
    except (ValueError, TypeError):
        return None


@dataclass(frozen=True)
class _Target:
    url: URL
    host: str  # as sent on the wire: IDNA-encoded, no brackets
    addresses: tuple[str, ...]  # every address the host resolved to, all allowed
    literal: bool  # the URL names an IP address, no DNS involved

    def routes(self) -> list[tuple[URL, dict[str, str], str | None]]:
        """(URL to connect to, extra headers, TLS server name) for each allowed address."""
        if self.literal:
            return [(self.url, {}, None)]
        host_header = self.host if self.url.is_default_port() else f"{self.host}:{self.url.port}"
        server_hostname = self.host if self.url.scheme == "https" else None
        return [
            (self.url.with_host(address), {"Host": host_header}, server_hostname)
            for address in self.addresses
        ]


async def _resolve(url: str, cfg: CallbacksConfig) -> _Target:
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        raise _refused("is not a valid URL") from None
    allowed = ("https", "http") if cfg.allow_http else ("https",)
    if parsed.scheme not in allowed:
        if parsed.scheme == "http":
            raise _refused(
                "must use https; plain http is refused unless callbacks.allow_http = true"
            )
        raise _refused(f"must be an absolute {' or '.join(s + '://' for s in allowed)} URL")
    host = parsed.raw_host
    if not host:
        raise _refused("has no host")
    port = parsed.port
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT_SECONDS):
            infos = await loop.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
    except TimeoutError:
        raise _refused(
            f"host {host!r} could not be resolved within {RESOLVE_TIMEOUT_SECONDS:g} s"
        ) from None
    except (OSError, UnicodeError) as exc:
        raise _refused(f"host {host!r} could not be resolved ({exc})") from None
    addresses: list[str] = []
    for info in infos:
        address = str(info[4][0]).partition("%")[0]  # drop an IPv6 scope id
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise _refused(f"host {host!r} could not be resolved (no addresses)")
    if not cfg.allow_private_networks:
        for address in addresses:
            why = _forbidden(ipaddress.ip_address(address))
            if why is None:
                continue
            shown = f"is {why}" if literal is not None else f"resolves to {address}, {why}"
            raise _refused(
                f"host {host!r} {shown}; the gateway refuses loopback, private, link-local, "
                "multicast and reserved addresses unless callbacks.allow_private_networks = true"
            )
    return _Target(parsed, host, tuple(addresses), literal is not None)


async def check_callback_url(url: str, cfg: CallbacksConfig) -> None:
    """Raise APIError(400) unless url is one the gateway may POST webhooks to."""
    await _resolve(url, cfg)


# -- delivery ---------------------------------------------------------------------


def _host(url: str) -> str:
    """The receiver a URL reaches: host and port."""
    try:
        parsed = URL(url)
        return f"{(parsed.host or '').lower()}:{parsed.port}"
    except ValueError:
        return url


class Callbacks:
    """The outbox worker: one loop, at most `concurrency` deliveries at a time."""

    def __init__(
        self,
        store: Store,
        session: aiohttp.ClientSession,
        config: CallbacksConfig,
        metrics: Metrics,
        load_task: Callable[[str], Awaitable[TaskRecord | None]],
        secret: str | None,
        *,
        attempt_timeout_seconds: float = ATTEMPT_TIMEOUT_SECONDS,
        backoff_base_seconds: float = BACKOFF_BASE_SECONDS,
        backoff_cap_seconds: float = BACKOFF_CAP_SECONDS,
        concurrency: int = CONCURRENCY,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self._session = session
        self._config = config
        self._metrics = metrics
        self._load_task = load_task
        self._secret = secret or None
        self._timeout = attempt_timeout_seconds
        self._backoff_base = backoff_base_seconds
        self._backoff_cap = backoff_cap_seconds
        self._concurrency = concurrency
        self._rng = rng or random.Random()
        self._wakeup = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._inflight: dict[int, asyncio.Task[None]] = {}
        self._inflight_hosts: dict[int, str] = {}
        # Rows whose attempt ended while the loop was reading the outbox: that
        # read may predate the attempt's record, so they must not be sent again.
        self._ended: set[int] = set()

    def wake(self) -> None:
        self._wakeup.set()

    def apply_config(self, config: CallbacksConfig) -> None:
        self._config = config
        self._backoff_base = config.backoff_base_seconds
        self.wake()

    async def start(self) -> None:
        if self._runner is None:
            self._runner = asyncio.create_task(self._run(), name="callbacks-outbox")

    async def stop(self) -> None:
        """Stop sending; attempts under way get a short grace to finish and be recorded."""
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        inflight = list(self._inflight.values())
        if inflight:
            grace = min(self._timeout + 1, SHUTDOWN_GRACE_SECONDS)
            _, late = await asyncio.wait(inflight, timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    def backoff_seconds(self, attempts: int) -> float:
        """Delay after the attempts-th failure: exponential, capped, jittered."""
        ceiling = min(self._backoff_cap, self._backoff_base * 2 ** (attempts - 1))
        return self._rng.uniform(ceiling / 2, ceiling)

    # -- the loop -----------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._wakeup.clear()
            try:
                delay = await self._dispatch()
            except Exception:
                log.exception("callback outbox scan failed", extra={"event": "callback_error"})
                delay = ERROR_PAUSE_SECONDS
            try:
                async with asyncio.timeout(delay):
                    await self._wakeup.wait()
            except TimeoutError:
                pass

    async def _dispatch(self) -> float:
        """Start the due deliveries; return how long to sleep unless woken."""
        now = now_ms()
        free = self._concurrency - len(self._inflight)
        per_host: dict[str, int] = {}
        for host in self._inflight_hosts.values():
            per_host[host] = per_host.get(host, 0) + 1
        if free > 0:
            self._ended.clear()
            for item in await self._store.outbox_due(now, SCAN_ROWS):
                if free == 0:
                    break
                if item.id in self._inflight or item.id in self._ended:
                    continue
                host = _host(item.url)
                if per_host.get(host, 0) >= PER_HOST:
                    continue  # its turn comes when one of its attempts ends
                per_host[host] = per_host.get(host, 0) + 1
                self._inflight_hosts[item.id] = host
                self._inflight[item.id] = asyncio.create_task(
                    self._deliver_guarded(item), name=f"callback-{item.task_id}"
                )
                free -= 1
        if free == 0:
            return IDLE_POLL_SECONDS  # a finishing delivery wakes the loop
        # The earliest row that could be sent now decides the next wake-up; rows
        # of hosts at their cap wait for one of their attempts to end, which wakes it.
        upcoming = await self._store.outbox_due(_FAR_FUTURE_MS, SCAN_ROWS)
        due = [
            i.next_attempt_ms for i in upcoming
            if i.id not in self._inflight and per_host.get(_host(i.url), 0) < PER_HOST
        ]
        if not due:
            return IDLE_POLL_SECONDS
        return min(max(0.0, (due[0] - now_ms()) / 1000), IDLE_POLL_SECONDS)

    async def _deliver_guarded(self, item: OutboxItem) -> None:
        try:
            await self._deliver(item)
        except Exception:
            log.exception(
                "callback delivery could not be recorded; it stays pending",
                extra={"event": "callback_error", "task_id": item.task_id},
            )
            await asyncio.sleep(ERROR_PAUSE_SECONDS)
        finally:
            # Only after the attempt is recorded, so the loop never sends a row twice at once.
            self._inflight.pop(item.id, None)
            self._inflight_hosts.pop(item.id, None)
            self._ended.add(item.id)
            self._wakeup.set()

    async def _deliver(self, item: OutboxItem) -> None:
        attempt = item.attempts + 1
        status: int | None = None
        task = await self._load_task(item.task_id)
        if task is None:
            error: str | None = "the task no longer exists"
        elif not task.is_final:
            error = f"the task is not final yet (state {task.state})"
        else:
            body = json.dumps(
                status_envelope(task), separators=(",", ":"), ensure_ascii=False
            ).encode()
            status, error = await self._attempt(item.url, task.id, body, attempt)
        await self._record(item, attempt, status, error)

    async def _attempt(
        self, url: str, task_id: str, body: bytes, attempt: int
    ) -> tuple[int | None, str | None]:
        """One POST: (HTTP status, None) after a 2xx, else (status or None, why it failed)."""
        try:
            async with asyncio.timeout(self._timeout):
                status = await self._post(url, task_id, body, attempt)
        except APIError as exc:  # refused at delivery time
            return None, exc.error
        except TimeoutError:
            return None, f"no answer within {self._timeout:g} s"
        except aiohttp.ClientError as exc:
            return None, f"{type(exc).__name__}: {exc}"
        if 200 <= status < 300:
            return status, None
        return status, f"HTTP {status}"

    async def _post(self, url: str, task_id: str, body: bytes, attempt: int) -> int:
        target = await _resolve(url, self._config)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-Gateway-Task-Id": task_id,
            "X-Gateway-Attempt": str(attempt),
        }
        if self._secret is not None:
            headers["X-Gateway-Signature"] = sign(self._secret, int(time.time()), body)
        last: aiohttp.ClientConnectorError | None = None
        for request_url, extra, server_hostname in target.routes():
            try:
                async with self._session.post(
                    request_url,
                    data=body,
                    headers={**headers, **extra},
                    server_hostname=server_hostname,
                    allow_redirects=False,  # a redirect could point anywhere
                    timeout=aiohttp.ClientTimeout(total=self._timeout),
                ) as resp:
                    return resp.status
            except aiohttp.ClientConnectorError as exc:
                last = exc  # this address refused the connection: try the next one
        assert last is not None
        raise last

    async def _record(
        self, item: OutboxItem, attempt: int, status: int | None, error: str | None
    ) -> None:
        now = now_ms()
        if error is not None:
            error = error[:MAX_ERROR_CHARS]
        context = {
            "task_id": item.task_id,
            "host": _host_of(item.url),
            "attempt": attempt,
            "status": status,
            "error": error,
        }
        if error is None:
            await self._store.outbox_record(
                item.id, state="delivered", attempts=attempt, next_attempt_ms=now,
                error=None, now_ms=now,
            )
            self._metrics.callback_deliveries.labels("delivered").inc()
            log.info("callback delivered", extra={"event": "callback_delivered", **context})
        elif attempt >= self._config.max_attempts:
            await self._store.outbox_record(
                item.id, state="gave_up", attempts=attempt, next_attempt_ms=now,
                error=error, now_ms=now,
            )
            self._metrics.callback_deliveries.labels("gave_up").inc()
            log.warning(
                "callback given up after the last attempt",
                extra={"event": "callback_gave_up", **context},
            )
        else:
            delay = self.backoff_seconds(attempt)
            await self._store.outbox_record(
                item.id, state="pending", attempts=attempt,
                next_attempt_ms=now + int(delay * 1000), error=error, now_ms=now,
            )
            self._metrics.callback_deliveries.labels("retried").inc()
            log.info(
                "callback attempt failed, will retry",
                extra={"event": "callback_retry", "retry_in_s": round(delay, 3), **context},
            )
