"""The APIXO client: one HTTP call at a time, retries with backoff and jitter, error mapping."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from typing import Any
from urllib.parse import quote

from gateway import __version__, jsonio
from gateway.errors import APIError
from gateway.http1 import Answer, AnswerTimeout, Client, TransportError
from gateway.metrics import Metrics

log = logging.getLogger("gateway.upstream")

BACKOFF_BASE_SECONDS = 0.25
BACKOFF_CAP_SECONDS = 8.0
RETRY_AFTER_CAP_SECONDS = 30.0


class TransientUpstreamError(Exception):
    """429, 5xx, no answer in time or a connection error: worth trying again later."""

    def __init__(self, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class UnreadableAnswer(TransientUpstreamError):
    """An answer whose body is not a JSON object. Worth asking again for a status
    poll; for a submit it depends on the status (see Upstream.submit)."""

    def __init__(self, detail: str, status: int) -> None:
        super().__init__(detail)
        self.status = status


class NoAnswer(TransientUpstreamError):
    """The request went out and no answer came within request_timeout_seconds.

    Worth asking again for a status poll. A submit is not sent again: APIXO may
    be working on it, and when it is slow rather than down every copy would
    become a task it bills (see Upstream.submit).
    """


def _not_resent(exc: TransientUpstreamError, what: str, message: str) -> APIError:
    """The client's error for a submit APIXO may have acted on: it is not sent again."""
    log.error(f"{what}; not resubmitted", extra={"error": str(exc)})
    return APIError(
        502, f"{exc}; the task may exist upstream, so it was not sent again", message=message,
    )


def _retry_after(headers: dict[str, str]) -> float | None:
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return min(max(float(value), 0.0), RETRY_AFTER_CAP_SECONDS)
    except ValueError:
        return None


def backoff_delay(attempt: int, rng: random.Random) -> float:
    """Half the capped exponential delay plus up to as much again at random.

    The random half spreads retries so a recovering upstream is not hit in
    lockstep; the fixed half keeps a retry from coming back at once.
    """
    ceiling = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2**attempt)
    return rng.uniform(ceiling / 2, ceiling)


class Upstream:
    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        timeout_seconds: float,
        max_retries: int,
        metrics: Metrics,
        connection_limit: int = 100,
    ) -> None:
        """ValueError for a base_url that is no http(s) URL or a key no header can carry."""
        if not api_key.isprintable() or not api_key.isascii():
            raise ValueError("the upstream API key has characters an HTTP header cannot carry")
        self._client = Client(
            base_url, limit=connection_limit, user_agent=f"apixo-gateway/{__version__}"
        )
        self._key = api_key
        self._headers = f"Authorization: Bearer {api_key}\r\n"
        self._json_headers = self._headers + "Content-Type: application/json\r\n"
        self._timeout_seconds = timeout_seconds
        self._max_retries = max_retries
        self._metrics = metrics
        self._rng = random.Random()

    async def close(self) -> None:
        await self._client.close()

    async def _call(
        self, operation: str, method: str, target: str, body: bytes | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """One HTTP call with an already encoded JSON body; transient failures raise
        TransientUpstreamError."""
        started = time.perf_counter()
        code = "error"
        try:
            try:
                answer = await self._client.request(
                    method, target, body=body,
                    headers=self._headers if body is None else self._json_headers,
                    timeout=self._timeout_seconds,
                )
            except AnswerTimeout as exc:
                raise NoAnswer(
                    f"no answer from APIXO within {self._timeout_seconds:g} s"
                ) from exc
            except TransportError as exc:
                if exc.status is None:
                    raise TransientUpstreamError(f"cannot reach APIXO: {exc}") from exc
                code = str(exc.status)
                detail = f"APIXO answered HTTP {exc.status} but its answer is unreadable: {exc}"
                if 200 <= exc.status < 300:
                    # APIXO had the request and said yes; only the rest of its
                    # answer is lost. See UnreadableAnswer.
                    raise UnreadableAnswer(detail, exc.status) from exc
                raise TransientUpstreamError(detail) from exc
            code = str(answer.status)
            return answer.status, self._payload(answer)
        finally:
            self._metrics.upstream_requests.labels(operation, code).inc()
            self._metrics.upstream_duration.labels(operation).observe(
                time.perf_counter() - started
            )

    def _payload(self, answer: Answer) -> dict[str, Any]:
        if answer.status == 429 or answer.status >= 500:
            raise TransientUpstreamError(
                f"APIXO answered HTTP {answer.status}: "
                f"{self._redact(answer.body[:200].decode('utf-8', 'replace'))}",
                _retry_after(answer.headers),
            )
        try:
            payload = jsonio.loads(answer.body, strict=False)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            raise UnreadableAnswer(
                f"APIXO answered HTTP {answer.status} with a body that is not a JSON object",
                answer.status,
            )
        return payload

    async def submit(self, model: str, body: dict[str, Any] | str) -> str:
        """Create an upstream task and return its id, or raise an APIError for the client.

        body may be the JSON text already: the gateway stores it that way, and
        decoding it only to encode it again cost a visible share of a submit.
        """
        encoded = (body if isinstance(body, str) else json.dumps(body)).encode()
        last = "no attempt made"
        slept = 0.0
        retry_after: float | None = None
        for attempt in range(self._max_retries + 1):
            try:
                status, payload = await self._call(
                    "submit", "POST", f"/generateTask/{quote(model, safe='')}", encoded
                )
            except NoAnswer as exc:
                raise _not_resent(exc, "APIXO did not answer a submit in time",
                                  "Upstream provider or network error") from None
            except UnreadableAnswer as exc:
                if 200 <= exc.status < 300:
                    # APIXO accepted the task but its id cannot be read. Sending it
                    # again would create (and bill) a second one; the team is
                    # refunded, as for a task whose acceptance a restart lost.
                    raise _not_resent(
                        exc, "APIXO accepted a submit but its answer cannot be read",
                        "Upstream error",
                    ) from None
                # A refusal (an HTML page from a proxy in front of APIXO, say):
                # the same request would be refused again.
                return self._submitted_id(exc.status, {"message": str(exc)})
            except TransientUpstreamError as exc:
                last = str(exc)
                if attempt == self._max_retries:
                    break
                # Retry-After: 0 is no reason to hammer a struggling upstream.
                delay = max(exc.retry_after or 0.0, backoff_delay(attempt, self._rng))
                if slept + delay > self._timeout_seconds:
                    # The client is waiting: past one request timeout of sleeping,
                    # it gets the 502 now, with when to try again.
                    retry_after = delay
                    break
                slept += delay
                log.warning(
                    "upstream submit failed, retrying",
                    extra={"attempt": attempt + 1, "delay_s": round(delay, 3), "error": last},
                )
                await asyncio.sleep(delay)
                continue
            return self._submitted_id(status, payload)
        attempts = attempt + 1
        raise APIError(
            502,
            f"APIXO is unavailable after {attempts} attempt{'s' if attempts > 1 else ''}: "
            f"{last}",
            message="Upstream provider or network error",
            headers={} if retry_after is None else {"Retry-After": str(math.ceil(retry_after))},
        )

    def _submitted_id(self, status: int, payload: dict[str, Any]) -> str:
        try:
            return _submitted_id(status, payload)
        except APIError as exc:
            # APIXO's words reach the client; the gateway's own key must not,
            # should an error page ever echo the request's headers.
            exc.error = self._redact(exc.error)
            raise

    def _redact(self, text: str) -> str:
        key = self._key
        return text.replace(key, "[upstream key]") if len(key) >= 4 else text

    async def status(self, model: str, upstream_id: str) -> dict[str, Any]:
        """The upstream task's data; TransientUpstreamError means "ask again later"."""
        status, payload = await self._call(
            "status", "GET",
            f"/statusTask/{quote(model, safe='')}?taskId={quote(upstream_id, safe='')}",
        )
        data = payload.get("data")
        if status != 200 or not isinstance(data, dict):
            raise TransientUpstreamError(
                f"APIXO statusTask answered HTTP {status}: {payload.get('message')!r}"
            )
        return data


def _upstream_detail(payload: dict[str, Any]) -> str:
    message = str(payload.get("message") or "")
    data = payload.get("data")
    if isinstance(data, dict) and data.get("error"):
        return f"{message}: {data['error']}" if message else str(data["error"])
    return message or "no message"


def _submitted_id(status: int, payload: dict[str, Any]) -> str:
    data = payload.get("data")
    if status == 200 and isinstance(data, dict) and isinstance(data.get("taskId"), str):
        return str(data["taskId"])
    detail = _upstream_detail(payload)
    if status == 400:
        # The client's own request was refused: pass APIXO's words through.
        data = payload.get("data")
        error = data.get("error") if isinstance(data, dict) else None
        raise APIError(
            400, str(error or detail), message=str(payload.get("message") or "Invalid request"),
            reason="invalid",
        )
    if status in (401, 403):
        raise APIError(
            502, f"The gateway's own APIXO key was refused (HTTP {status}: {detail}); "
            "the operator must fix upstream.api_key_env", message="Upstream authentication error",
        )
    if status == 402:
        raise APIError(
            502, f"The gateway's APIXO account has insufficient balance ({detail}); "
            "the operator must top it up", message="Upstream balance exhausted",
        )
    if status == 404:
        raise APIError(502, f"APIXO does not serve this model ({detail})",
                       message="Upstream model not found")
    raise APIError(502, f"APIXO answered HTTP {status}: {detail}", message="Upstream error")
