"""Request identity, the result cache (SQLite behind an in-memory front) and in-flight joining."""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from cachetools import LRUCache

from gateway.errors import APIError
from gateway.store import CacheEntry, Store

# One encoder for every call: json.dumps with options builds a new one each time.
_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode


def canonical_json(value: Any) -> str:
    """Key order and formatting never change a request's identity."""
    return _canonical(value)


def request_identity(model: str, input_: dict[str, Any], provider: str) -> str:
    payload = canonical_json({"model": model, "input": input_, "provider": provider})
    return hashlib.sha256(payload.encode()).hexdigest()


def cache_key(identity: str, scope: str, team: str) -> str:
    # The scope is part of the key so switching scope never serves across teams.
    return f"team:{team}:{identity}" if scope == "team" else f"global:{identity}"


class ResultCache:
    """Successful results by cache key; SQLite is the truth, memory answers hot keys."""

    def __init__(self, store: Store, memory_entries: int, ttl_ms: int) -> None:
        self._store = store
        self._front: LRUCache[str, CacheEntry] = LRUCache(maxsize=memory_entries)
        self._ttl_ms = ttl_ms

    def set_ttl(self, ttl_ms: int) -> None:
        """A reload's ttl_seconds. Entries carry the expiry of the TTL they were
        stored under; SQLite reads also check the current one, and a lowered TTL
        empties the memory front, which refills from SQLite."""
        if ttl_ms < self._ttl_ms:
            self._front.clear()
        self._ttl_ms = ttl_ms

    def get_hot(self, key: str, now_ms: int) -> CacheEntry | None:
        entry = self._front.get(key)
        if entry is not None and entry.expires_ms <= now_ms:
            self._front.pop(key, None)
            return None
        return entry

    async def get(self, key: str, now_ms: int) -> CacheEntry | None:
        entry = self.get_hot(key, now_ms)
        if entry is None:
            entry = await self._store.cache_get(key, now_ms, self._ttl_ms)
            if entry is not None:
                self._front[key] = entry
        return entry

    def remember(self, entry: CacheEntry) -> None:
        self._front[entry.key] = entry

    def forget_expired(self, now_ms: int, swept: list[str]) -> None:
        """Drop what expired, and what the size sweep removed from SQLite."""
        for key in [k for k, e in self._front.items() if e.expires_ms <= now_ms]:
            self._front.pop(key, None)
        for key in swept:
            self._front.pop(key, None)


@dataclass
class Flight:
    """An identity being worked on upstream; identical requests join its leader.

    `ready` resolves to the leader's task id once the upstream task exists; to
    the APIError upstream refused it with, which the waiters answer too (the same
    body would be refused the same way, and retrying it once per waiter, one
    after another, would keep them waiting for minutes); or to None if the leader
    stopped for a reason of its own (its team's budget or limits, a cancelled
    request): the waiters then run the whole decision again themselves.
    """

    ready: asyncio.Future[str | APIError | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    leader_id: str | None = None


class Flights:
    """Identities on their way upstream (Flight) and in flight upstream (a leader id).

    Once airborne a flight is only its leader's id: with thousands of tasks in
    flight, a Flight and its future each were objects every full garbage
    collection walked, and a joiner needs nothing from them but the id.
    """

    def __init__(self) -> None:
        self._by_key: dict[str, Flight] = {}
        self._airborne: dict[str, str] = {}  # key -> leader task id
        self._by_leader: dict[str, str] = {}

    def leader(self, key: str) -> str | None:
        """The task id of an identical request already upstream."""
        return self._airborne.get(key)

    def get(self, key: str) -> Flight | None:
        """An identical request about to go upstream."""
        return self._by_key.get(key)

    def start(self, key: str) -> Flight:
        flight = Flight()
        self._by_key[key] = flight
        return flight

    def lift_off(self, key: str, flight: Flight, leader_id: str) -> None:
        flight.leader_id = leader_id
        if self._by_key.get(key) is flight:
            del self._by_key[key]
            self._airborne[key] = leader_id
            self._by_leader[leader_id] = key
        if not flight.ready.done():
            flight.ready.set_result(leader_id)

    def adopt(self, key: str, leader_id: str) -> None:
        """Make an in-flight task found at startup joinable again."""
        self._airborne[key] = leader_id
        self._by_leader[leader_id] = key

    def abort(self, key: str, flight: Flight, refusal: APIError | None = None) -> None:
        if self._by_key.get(key) is flight:
            del self._by_key[key]
        if not flight.ready.done():
            flight.ready.set_result(refusal)

    def land(self, leader_id: str) -> None:
        key = self._by_leader.pop(leader_id, None)
        if key is not None and self._airborne.get(key) == leader_id:
            del self._airborne[key]

    def __len__(self) -> int:
        return len(self._by_key) + len(self._airborne)
