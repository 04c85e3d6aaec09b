"""config.toml -> frozen, validated dataclasses.

Unknown keys are errors: a typo such as `budget_ud` must never silently
disable a budget.
"""

from __future__ import annotations

import hashlib
import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from yarl import URL

from gateway.money import MICROS_PER_USD, Micros, usd_to_micros

BUDGET_PERIODS = ("total", "daily", "weekly", "monthly")
CACHE_SCOPES = ("global", "team")


class ConfigError(Exception):
    """Every problem found in a config file, each prefixed by its key path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 65536


@dataclass(frozen=True)
class UpstreamConfig:
    base_url: str = "https://api.apixo.ai/api/v1"
    api_key_env: str = "APIXO_API_KEY"
    max_concurrent: int = 32
    request_timeout_seconds: float = 30.0
    max_retries: int = 3
    first_poll_seconds: float = 15.0
    poll_interval_seconds: float = 3.0
    task_timeout_seconds: float = 900.0


@dataclass(frozen=True)
class StorageConfig:
    path: str = "gateway.db"


@dataclass(frozen=True)
class CacheConfig:
    enabled: bool = True
    ttl_seconds: int = 1_209_600
    scope: str = "global"
    memory_entries: int = 10_000
    max_entries: int = 1_000_000
    # How often expired entries are deleted in the background, not only on read.
    sweep_interval_seconds: float = 300.0


@dataclass(frozen=True)
class CallbacksConfig:
    allow_http: bool = False
    allow_private_networks: bool = False
    max_attempts: int = 8
    signing_secret_env: str = "GATEWAY_WEBHOOK_SECRET"
    backoff_base_seconds: float = 5.0


@dataclass(frozen=True)
class AdminConfig:
    token_env: str = "GATEWAY_ADMIN_TOKEN"


@dataclass(frozen=True)
class LoggingConfig:
    format: str = "json"
    level: str = "INFO"
    log_prompts: bool = False


@dataclass(frozen=True)
class TeamConfig:
    name: str
    key_hashes: tuple[bytes, ...]
    plain_keys: bool = False
    budget: Micros | None = None
    budget_period: str = "monthly"
    max_concurrent: int | None = None
    requests_per_minute: int | None = None

    @property
    def budget_usd(self) -> float | None:
        return None if self.budget is None else self.budget / 1_000_000


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    pricing: dict[str, Micros] = field(default_factory=lambda: {"grok-image": 100_000})
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    teams: tuple[TeamConfig, ...] = ()
    source: str = "<defaults>"

    def team(self, name: str) -> TeamConfig | None:
        for team in self.teams:
            if team.name == name:
                return team
        return None


_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "upstream": UpstreamConfig,
    "storage": StorageConfig,
    "cache": CacheConfig,
    "callbacks": CallbacksConfig,
    "admin": AdminConfig,
    "logging": LoggingConfig,
}

_POSITIVE = {
    "server.port",
    "server.max_body_bytes",
    "upstream.max_concurrent",
    "upstream.request_timeout_seconds",
    "upstream.poll_interval_seconds",
    "upstream.task_timeout_seconds",
    "cache.ttl_seconds",
    "cache.memory_entries",
    "cache.max_entries",
    "cache.sweep_interval_seconds",
    "callbacks.max_attempts",
    "callbacks.backoff_base_seconds",
}

_CHOICES = {
    "cache.scope": CACHE_SCOPES,
    "logging.format": ("json", "text"),
    "logging.level": ("DEBUG", "INFO", "WARNING", "ERROR"),
}


def _type_ok(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, type(default))


def _type_name(default: Any) -> str:
    if isinstance(default, bool):
        return "a boolean"
    if isinstance(default, int):
        return "an integer"
    if isinstance(default, float):
        return "a number"
    return "a string"


def _base_url_problem(base_url: str) -> str | None:
    if not base_url.startswith(("http://", "https://")):
        return "must start with http:// or https://"
    try:
        url = URL(base_url)
    except ValueError as exc:  # a port past 65535, no host
        return f"{exc}: {base_url!r}"
    if not url.raw_host:
        return f"has no host: {base_url!r}"
    if url.query_string or url.fragment:
        return f"must have no query or fragment: {base_url!r}"
    return None


def _storage_path_problem(path: str) -> str | None:
    # SQLite reads "" and ":memory:" as databases that vanish with the process,
    # and a "file:" URI as a path only with flags this gateway never sets.
    if not path.strip():
        return "must be a file path, got ''"
    if path == ":memory:" or path.startswith("file:"):
        return f"must be a file path (the database must outlive the process), got {path!r}"
    return None


def _nonblank(rule: str) -> Callable[[str], str | None]:
    return lambda value: None if value.strip() else f"{rule}, got ''"


# Checks of one value past its type and range: a problem, or None.
_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "server.port": lambda port: "must be at most 65535" if port > 65535 else None,
    "server.host": _nonblank("must be an address or host name"),
    "upstream.base_url": _base_url_problem,
    "upstream.api_key_env": _nonblank("must name an environment variable"),
    "storage.path": _storage_path_problem,
}


def _section(name: str, raw: Any, cls: type, problems: list[str]) -> Any:
    if not isinstance(raw, dict):
        problems.append(f"{name}: must be a table")
        return cls()
    defaults = cls()
    values: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{name}.{key}"
        if not hasattr(defaults, key):
            problems.append(f"{path}: unknown key")
            continue
        default = getattr(defaults, key)
        if not _type_ok(value, default):
            problems.append(f"{path}: must be {_type_name(default)}, got {value!r}")
            continue
        if isinstance(default, float):
            value = float(value)
            # TOML spells nan and inf; every comparison below is false for nan,
            # and either would break the timers and Retry-After they feed.
            if not math.isfinite(value):
                problems.append(f"{path}: must be a finite number, got {value!r}")
                continue
        if path in _POSITIVE and value <= 0:
            problems.append(f"{path}: must be greater than 0, got {value!r}")
            continue
        if value is not None and not isinstance(value, bool) and isinstance(value, int | float):
            if value < 0:
                problems.append(f"{path}: must not be negative, got {value!r}")
                continue
        if path in _CHOICES and value not in _CHOICES[path]:
            choices = ", ".join(repr(c) for c in _CHOICES[path])
            problems.append(f"{path}: must be one of {choices}, got {value!r}")
            continue
        problem = _CHECKS[path](value) if path in _CHECKS else None
        if problem:
            problems.append(f"{path}: {problem}")
            continue
        values[key] = value
    return cls(**values)


# Far above any real price or budget, far below where sums of micro-dollars
# would overflow SQLite's 64-bit integers (every submit then failed with a 500).
MAX_PRICE_USD = 10_000
MAX_BUDGET_USD = 1_000_000_000


def _price(
    path: str, value: Any, problems: list[str], limit: int = MAX_PRICE_USD
) -> Micros | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        problems.append(f"{path}: must be a number of USD, got {value!r}")
        return None
    try:
        micros = usd_to_micros(Decimal(str(value)))
    except (InvalidOperation, ValueError):
        problems.append(f"{path}: not a valid amount: {value!r}")
        return None
    if micros < 0:
        problems.append(f"{path}: must not be negative, got {value!r}")
        return None
    if micros > limit * MICROS_PER_USD:
        problems.append(f"{path}: must be at most {limit:,} USD, got {value!r}")
        return None
    return micros


def _key_hash(path: str, entry: Any, problems: list[str]) -> tuple[bytes | None, bool]:
    if not isinstance(entry, str):
        problems.append(f"{path}: must be a string 'sha256:<hex>' or 'plain:<key>'")
        return None, False
    if entry.startswith("sha256:"):
        hexpart = entry[len("sha256:"):].strip().lower()
        try:
            digest = bytes.fromhex(hexpart)
        except ValueError:
            digest = b""
        if len(digest) != 32:
            problems.append(f"{path}: 'sha256:' must be followed by 64 hex characters")
            return None, False
        return digest, False
    if entry.startswith("plain:"):
        key = entry[len("plain:"):]
        if not key:
            problems.append(f"{path}: 'plain:' key is empty")
            return None, False
        return hashlib.sha256(key.encode()).digest(), True
    problems.append(f"{path}: must start with 'sha256:' or 'plain:'")
    return None, False


_TEAM_KEYS = {
    "name", "api_keys", "budget_usd", "budget_period", "max_concurrent", "requests_per_minute",
}


def _team(index: int, raw: Any, problems: list[str]) -> TeamConfig | None:
    base = f"teams[{index}]"
    if not isinstance(raw, dict):
        problems.append(f"{base}: must be a table")
        return None
    for key in raw:
        if key not in _TEAM_KEYS:
            problems.append(f"{base}.{key}: unknown key")
    name = raw.get("name")
    if isinstance(name, str) and name.strip():
        base = f"teams[{index}] ({name})"
    else:
        # The rest is still checked: check-config reports every problem at once.
        problems.append(f"{base}.name: required, a non-empty string")
        name = None
    keys = raw.get("api_keys", [])
    hashes: list[bytes] = []
    plain = False
    if not isinstance(keys, list) or not keys:
        problems.append(f"{base}.api_keys: required, a non-empty list")
    else:
        for i, entry in enumerate(keys):
            digest, is_plain = _key_hash(f"{base}.api_keys[{i}]", entry, problems)
            if digest is not None:
                hashes.append(digest)
                plain = plain or is_plain
    budget = None
    if "budget_usd" in raw:
        budget = _price(f"{base}.budget_usd", raw["budget_usd"], problems, MAX_BUDGET_USD)
    period = raw.get("budget_period", "monthly")
    if period not in BUDGET_PERIODS:
        choices = ", ".join(repr(p) for p in BUDGET_PERIODS)
        problems.append(f"{base}.budget_period: must be one of {choices}, got {period!r}")
        period = "monthly"
    limits: dict[str, int | None] = {}
    for key in ("max_concurrent", "requests_per_minute"):
        value = raw.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value <= 0
        ):
            problems.append(f"{base}.{key}: must be a positive integer, got {value!r}")
            value = None
        limits[key] = value
    if name is None:
        return None
    return TeamConfig(
        name=name,
        key_hashes=tuple(hashes),
        plain_keys=plain,
        budget=budget,
        budget_period=period,
        max_concurrent=limits["max_concurrent"],
        requests_per_minute=limits["requests_per_minute"],
    )


def parse_config(
    raw: dict[str, Any], source: str = "<memory>", *, check_storage: bool = False
) -> Config:
    """A validated Config, or a ConfigError listing every problem found.

    check_storage also looks at the disk: whether the database can be created
    where storage.path says (for serve and check-config, not for a reload,
    which keeps the running database).
    """
    problems: list[str] = []
    sections: dict[str, Any] = {}
    pricing: dict[str, Micros] = {"grok-image": 100_000}
    teams: list[TeamConfig] = []
    for key, value in raw.items():
        if key in _SECTIONS:
            sections[key] = _section(key, value, _SECTIONS[key], problems)
        elif key == "pricing":
            if not isinstance(value, dict):
                problems.append("pricing: must be a table of model = USD per image")
                continue
            pricing = {}
            for model, price in value.items():
                micros = _price(f"pricing.{model}", price, problems)
                if micros is not None:
                    pricing[model] = micros
        elif key == "teams":
            if not isinstance(value, list):
                problems.append("teams: must be an array of tables ([[teams]])")
                continue
            for i, entry in enumerate(value):
                team = _team(i, entry, problems)
                if team is not None:
                    teams.append(team)
        else:
            problems.append(f"{key}: unknown key")
    seen_names: set[str] = set()
    seen_keys: dict[bytes, str] = {}
    for team in teams:
        if team.name in seen_names:
            problems.append(f"teams: duplicate team name {team.name!r}")
        seen_names.add(team.name)
        for digest in team.key_hashes:
            other = seen_keys.get(digest)
            if other is not None and other != team.name:
                problems.append(f"teams: the same API key is used by {other!r} and {team.name!r}")
            seen_keys[digest] = team.name
    if check_storage and not any(p.startswith("storage") for p in problems):
        problems += storage_problems(sections.get("storage") or StorageConfig())
    if problems:
        raise ConfigError(problems)
    return Config(pricing=pricing, teams=tuple(teams), source=source, **sections)


def storage_problems(storage: StorageConfig) -> list[str]:
    """What the file's own checks cannot see: whether the database can be created
    where it says. Without this, serve died with a traceback from SQLite."""
    directory = Path(storage.path).parent
    if not directory.is_dir():
        return [f"storage.path: the directory {str(directory)!r} does not exist"]
    if Path(storage.path).is_dir():
        return [f"storage.path: {storage.path!r} is a directory, not a database file"]
    return []


def load_config(
    path: str | Path, *, check_storage: bool = False, serving: bool = True
) -> Config:
    """The file's Config, or a ConfigError listing every problem.

    serving: the file is to run a gateway (serve, check-config, a reload), not
    only to find its database (usage), so it must have teams and prices.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    # A file that parses but serves nobody is a mistake, not a choice: every
    # request would be refused. (parse_config alone allows it, for defaults.)
    useless = []
    if serving and raw.get("teams") in (None, []):
        useless.append("teams: no team is configured, so every request would get a 401")
    if serving and raw.get("pricing") == {}:
        useless.append("pricing: no model is priced, so every submit would get a 404")
    try:
        config = parse_config(raw, source=str(path), check_storage=check_storage)
    except ConfigError as exc:
        raise ConfigError(exc.problems + useless) from None
    if useless:
        raise ConfigError(useless)
    return config


# Read once at startup (the listening socket, the database file, the upstream
# client, the log handler, the memory cache's size, the webhook secret): a
# SIGHUP cannot apply them, and pretending to (quoting a new body limit while
# the old one is enforced) would mislead. Everything else reloads.
RESTART_ONLY: dict[str, tuple[str, ...]] = {
    "server": ("host", "port", "max_body_bytes"),
    "storage": ("path",),
    "upstream": (
        "base_url", "api_key_env", "request_timeout_seconds", "max_retries",
        "first_poll_seconds", "poll_interval_seconds", "task_timeout_seconds",
    ),
    "cache": ("memory_entries",),
    "callbacks": ("signing_secret_env",),
    "logging": ("format", "level", "log_prompts"),
}


def reloaded(running: Config, fresh: Config) -> tuple[Config, list[str]]:
    """The config a SIGHUP applies: `fresh`, with the restart-only settings kept as running.

    Also returns the restart-only settings that differ, as "section.key (old -> new)".
    """
    waiting: list[str] = []
    sections: dict[str, Any] = {}
    for section, keys in RESTART_ONLY.items():
        old, new = getattr(running, section), getattr(fresh, section)
        kept = {key: getattr(old, key) for key in keys}
        for key, value in kept.items():
            if getattr(new, key) != value:
                waiting.append(f"{section}.{key} ({value!r} -> {getattr(new, key)!r})")
        sections[section] = replace(new, **kept)
    return replace(fresh, **sections), waiting
