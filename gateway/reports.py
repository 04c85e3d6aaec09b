"""Operator commands beside `serve`: `usage` (spend per team from the ledger) and `keys new`."""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import json
import secrets
import sqlite3
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

import aiosqlite

from gateway.budget import parse_day
from gateway.config import ConfigError, load_config
from gateway.money import MICROS_PER_USD, Micros, micros_to_usd
from gateway.store import Store

KEY_PREFIX = "apx_"
FORMATS = ("table", "json", "csv")

# (field, table heading, is money): the order of columns in every format.
_COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("spent", "SPENT", True),
    ("images", "IMAGES", False),
    ("cache_hits", "CACHE HITS", False),
    ("saved", "SAVED", True),
    ("upstream_tasks", "TASKS", False),
    ("failures", "FAILURES", False),
    ("reserved", "RESERVED", True),
)


class _ReadOnlyStore(Store):
    """The gateway's Store, opened read-only: a report never writes, never migrates, and
    never creates a database, so it is safe beside a running gateway (WAL readers do not
    block the writer)."""

    async def open_readonly(self) -> None:
        # self.path is a file: URI with mode=ro (see cmd_usage).
        self._reader = await aiosqlite.connect(self.path, uri=True, isolation_level=None)
        await self._reader.execute("PRAGMA busy_timeout=5000")


def _day(value: str) -> str:
    try:
        return parse_day(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {value!r}") from None


def exact_usd(micros: Micros) -> str:
    """The amount to the micro-dollar, as short as it can be: '0.3', '12.000001', '0'."""
    return f"{Decimal(micros).scaleb(-6).normalize():f}"


def _cents(micros: Micros) -> str:
    return f"${Decimal(micros) / MICROS_PER_USD:,.2f}"


async def _read_usage(
    db_uri: str, *, team: str | None, since: str | None, until: str | None, by_day: bool
) -> list[dict[str, Any]]:
    store = _ReadOnlyStore(db_uri)
    await store.open_readonly()
    try:
        return await store.usage_report(
            team=team, since_day=since, until_day=until, by_day=by_day
        )
    finally:
        await store.close()


def _rows(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "team": r["team"],
            "day": r["day"],
            "spent": r["spent_micros"],
            "images": r["images"],
            "cache_hits": r["cache_hits"],
            "saved": r["saved_micros"],
            "upstream_tasks": r["upstream_tasks"],
            "failures": r["failures"],
            "reserved": r["reserved_micros"],
        }
        for r in raw
    ]


def _total(rows: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"team": "TOTAL", "day": None}
    for name, _, _ in _COLUMNS:
        total[name] = sum(r[name] for r in rows)
    return total


def _write_table(rows: list[dict[str, Any]], by_day: bool, out: TextIO) -> None:
    headings = ["TEAM", *(["DAY"] if by_day else []), *(h for _, h, _ in _COLUMNS)]
    lines = []
    for row in [*rows, *([_total(rows)] if len(rows) > 1 else [])]:
        cells = [row["team"], *([row["day"] or ""] if by_day else [])]
        cells += [_cents(row[n]) if money else str(row[n]) for n, _, money in _COLUMNS]
        lines.append(cells)
    widths = [max(len(c) for c in col) for col in zip(headings, *lines, strict=False)]
    left = 2 if by_day else 1  # text columns align left, numbers right

    def fmt(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    print(fmt(headings), file=out)
    for cells in lines:
        print(fmt(cells), file=out)


def _record(row: dict[str, Any], by_day: bool, money: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"team": row["team"]}
    if by_day:
        record["day"] = row["day"]
    for name, _, is_money in _COLUMNS:
        record[f"{name}_usd" if is_money else name] = money(row[name]) if is_money else row[name]
    return record


def _write_json(rows: list[dict[str, Any]], by_day: bool, out: TextIO) -> None:
    # micros_to_usd's float prints as the shortest decimal that reads back the same,
    # which for any amount under $1e9 is exactly micros / 10**6 ("0.3", not 0.30000000000000004).
    payload = {
        "rows": [_record(r, by_day, micros_to_usd) for r in rows],
        "total": {
            k: v for k, v in _record(_total(rows), False, micros_to_usd).items() if k != "team"
        },
    }
    json.dump(payload, out, indent=2)
    out.write("\n")


def _write_csv(rows: list[dict[str, Any]], by_day: bool, out: TextIO) -> None:
    records = [_record(r, by_day, exact_usd) for r in rows]
    fieldnames = list(_record(_total([]), by_day, exact_usd))
    writer = csv.DictWriter(out, fieldnames=fieldnames, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)


def cmd_usage(args: argparse.Namespace) -> int:
    path = args.config or "config.toml"
    try:
        config = load_config(path, serving=False)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return 2
    if args.since and args.until and args.since > args.until:
        print(f"error: --since {args.since} is after --until {args.until}", file=sys.stderr)
        return 2
    db_path = config.storage.path
    if not Path(db_path).exists():
        print(f"error: no database at {db_path} (storage.path in {path}); the gateway "
              "creates it on first start", file=sys.stderr)
        return 1
    try:
        raw = asyncio.run(_read_usage(
            Path(db_path).resolve().as_uri() + "?mode=ro",
            team=args.team, since=args.since, until=args.until, by_day=args.by_day,
        ))
    except sqlite3.Error as exc:
        print(f"error: cannot read {db_path}: {exc}", file=sys.stderr)
        return 1
    rows = _rows(raw)
    if not args.by_day:
        # Configured teams with no activity yet still get a (zero) line.
        seen = {r["team"] for r in rows}
        for team in config.teams:
            if team.name not in seen and args.team in (None, team.name):
                rows.append({**_total([]), "team": team.name})
        rows.sort(key=lambda r: r["team"])
    writer = {"table": _write_table, "json": _write_json, "csv": _write_csv}[args.format]
    writer(rows, args.by_day, sys.stdout)
    return 0


def new_key() -> tuple[str, str]:
    """(key, config entry): the key is shown once; only its hash goes in the config."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def cmd_keys_new(args: argparse.Namespace) -> int:
    key, entry = new_key()
    print(f"New API key for team {args.team!r} (shown only once; store it now):")
    print(f"  {key}")
    print(f"Paste this into the [[teams]] entry with name = {json.dumps(args.team)} in "
          "config.toml (append to any keys it already has), then reload with SIGHUP:")
    print(f"api_keys = [{json.dumps(entry)}]")
    return 0


def add_commands(sub: Any) -> None:
    usage = sub.add_parser("usage", help="print spend per team from the database")
    usage.add_argument("--config", help="config file (default ./config.toml)")
    usage.add_argument("--team", help="only this team")
    usage.add_argument("--since", type=_day, help="first UTC day, YYYY-MM-DD (inclusive)")
    usage.add_argument("--until", type=_day, help="last UTC day, YYYY-MM-DD (inclusive)")
    usage.add_argument("--by-day", action="store_true", help="one row per team and UTC day")
    usage.add_argument("--format", choices=FORMATS, default="table")
    usage.set_defaults(func=cmd_usage)

    keys = sub.add_parser("keys", help="manage team API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    new = keys_sub.add_parser("new", help="print a fresh random key and its config line")
    new.add_argument("--team", required=True, help="the team the key is for")
    new.set_defaults(func=cmd_keys_new)
