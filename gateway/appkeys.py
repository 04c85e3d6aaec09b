"""Typed keys for the state shared on the aiohttp app."""

from __future__ import annotations

from aiohttp import web

from gateway.config import Config
from gateway.core import Gateway
from gateway.metrics import Metrics

GATEWAY = web.AppKey("gateway", Gateway)
METRICS = web.AppKey("metrics", Metrics)
CONFIG = web.AppKey("config", Config)
UPSTREAM_KEY = web.AppKey("upstream_key", str)
UPSTREAM_URL = web.AppKey("upstream_url", str)
MOCK_UPSTREAM = web.AppKey("mock_upstream", bool)
