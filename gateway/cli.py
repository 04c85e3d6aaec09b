"""Command line: serve, mock-upstream, check-config, usage, keys."""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import math
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING

from gateway.config import ConfigError, load_config, reloaded
from gateway.dblock import DatabaseLockError
from gateway.logs import setup_logging

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger("gateway")

DEFAULT_CONFIG = "config.toml"
_CANNOT_LISTEN = (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES)


def cmd_serve(args: argparse.Namespace) -> int:
    # Until the reload handler is installed (after the database is open and the
    # tasks resumed), a SIGHUP's default action would kill the process: it is
    # noted instead and applied once the handler is in place.
    early_reload: list[bool] = []
    signal.signal(signal.SIGHUP, lambda signum, frame: early_reload.append(True))
    # Imported here, after the handler: aiohttp and the app take most of the
    # start-up time, and a SIGHUP then would have ended the process.
    from aiohttp import web

    from gateway.app import create_app
    from gateway.appkeys import GATEWAY

    path = args.config or DEFAULT_CONFIG
    if args.config is None and not os.path.exists(path):
        print(f"config error: ./{DEFAULT_CONFIG} not found; pass --config PATH "
              "(config.toml in the apixo-gateway repository is a commented sample)",
              file=sys.stderr)
        return 2
    try:
        config = load_config(path, check_storage=True)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return 2
    setup_logging(config.logging.format, config.logging.level)
    key = os.environ.get(config.upstream.api_key_env, "")
    if not key and not args.mock_upstream:
        print(
            f"error: environment variable {config.upstream.api_key_env} is not set; set it to "
            "your APIXO API key, or run with --mock-upstream to use the bundled simulator",
            file=sys.stderr,
        )
        return 2
    for team in config.teams:
        if team.plain_keys:
            log.warning("team %s has a plain: API key in the config; store sha256: hashes "
                        "instead (apixo-gateway keys new)", team.name)
    if not config.teams:
        log.warning("no [[teams]] configured: every request will get 401")
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    app = create_app(config, upstream_key=key, mock_upstream=args.mock_upstream)

    async def on_startup(app: web.Application) -> None:
        loop = asyncio.get_running_loop()

        def reload() -> None:
            try:
                fresh = load_config(path)
            except ConfigError as exc:
                log.error("SIGHUP: config not reloaded, it has errors",
                          extra={"problems": exc.problems})
                return
            fresh, waiting = reloaded(app[GATEWAY].config, fresh)
            app[GATEWAY].apply_config(fresh)
            app[GATEWAY].callbacks.apply_config(fresh.callbacks)
            log.info("SIGHUP: reloaded teams, budgets and limits", extra={"config": path})
            if waiting:
                log.warning("SIGHUP: these settings take effect at the next restart",
                            extra={"settings": waiting})

        loop.add_signal_handler(signal.SIGHUP, reload)
        if early_reload:
            loop.call_soon(reload)

    async def on_ready(app: web.Application) -> None:
        # Everything loaded so far (modules, config, the app) lives as long as
        # the process: out of the collector's sight, a full collection scans
        # only what requests created, and no longer pauses the loop for 40 ms.
        gc.freeze()

    def listening(*_banner: object) -> None:
        # In place of aiohttp's banner, which it prints once the port is bound:
        # on_startup runs before that, and a busy port then logged "listening".
        log.info("apixo-gateway listening", extra={
            "url": f"http://{host}:{port}/api/v1", "config": config.source,
            "mock_upstream": args.mock_upstream, "teams": len(config.teams),
        })

    app.on_startup.append(on_startup)
    app.on_startup.append(on_ready)
    try:
        web.run_app(
            app, host=host, port=port, access_log=None, print=listening,
            shutdown_timeout=config.upstream.request_timeout_seconds + 5,
            # aiohttp's default, stated because the submit path relies on it: a
            # client hanging up must not cancel a submit between its reservation
            # and its upstream call.
            handler_cancellation=False,
        )
    except DatabaseLockError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except socket.gaierror as exc:  # a --host or server.host that names nothing
        print(f"error: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in _CANNOT_LISTEN:
            raise
        print(f"error: cannot listen on {host}:{port}: {os.strerror(exc.errno)}", file=sys.stderr)
        return 2
    log.info("apixo-gateway stopped")
    return 0


def cmd_mock_upstream(args: argparse.Namespace) -> int:
    from aiohttp import web

    from gateway.simulator import create_simulator_app

    setup_logging("text", "INFO")
    app = create_simulator_app(latency=args.latency, fail_rate=args.fail_rate)
    print(f"APIXO simulator on http://{args.host}:{args.port}/api/v1 "
          f"(latency {args.latency:g} s, fail rate {args.fail_rate:g})", flush=True)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    path = args.config or DEFAULT_CONFIG
    try:
        config = load_config(path, check_storage=True)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        print(f"{path}: {len(exc.problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{path}: OK ({len(config.teams)} teams, models: {', '.join(sorted(config.pricing))})")
    return 0


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number, 0-65535, got {text!r}")
    return port


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan  # fails every range check below


def _seconds(text: str) -> float:
    value = _float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, 0 or more, got {text!r}")
    return value


def _share(text: str) -> float:
    value = _float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apixo-gateway",
        description="A local proxy gateway for the APIXO image-generation API.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help=f"config file (default ./{DEFAULT_CONFIG})")
    serve.add_argument("--host")
    serve.add_argument("--port", type=_port)
    serve.add_argument("--mock-upstream", action="store_true",
                       help="use the bundled APIXO simulator as upstream (no key needed)")
    serve.set_defaults(func=cmd_serve)

    mock = sub.add_parser("mock-upstream", help="run the APIXO simulator alone")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=_port, default=8090)
    mock.add_argument("--latency", type=_seconds, default=2.0,
                      help="seconds until a task is final")
    mock.add_argument("--fail-rate", type=_share, default=0.0,
                      help="share of tasks that fail, 0 to 1")
    mock.set_defaults(func=cmd_mock_upstream)

    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("--config")
    check.set_defaults(func=cmd_check_config)

    from gateway import reports

    reports.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code
