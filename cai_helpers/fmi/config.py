"""Communicator configuration: enabled channels, timeouts and cost-model constants.

A configuration is a dict or a JSON file with this shape (every key optional except
at least one channel)::

    {
      "channels": {
        "direct": {"host": "127.0.0.1", "port": 10000, "token_file": "/run/fmi-token"},
        "redis": {"host": "127.0.0.1", "port": 6379, "prefix": "fmi"},
        "objectstore": {"location": "s3://bucket/fmi", "endpoint_url": null,
                        "prefix": "jobs", "poll_interval_s": 0.05}
      },
      "pin": null,
      "objective": "cheap",
      "timeouts": {"pairing_s": 30, "io_s": 60},
      "policy": {"message_bytes": 8192, "function_memory_mb": 2048}
    }

``pin`` names one channel that every operation uses. Otherwise the policy in
:mod:`cai_helpers.fmi.policy` picks a channel per operation.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from cai_helpers.errors import InvalidParameterError

CHANNEL_ORDER = ("direct", "redis", "objectstore")
OBJECTIVES = ("fast", "cheap")
DEFAULT_RENDEZVOUS_PORT = 10000
DEFAULT_REDIS_PORT = 6379


@dataclass
class DirectSettings:
    """Rendezvous server address and hole-punching settings of the direct TCP channel."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_RENDEZVOUS_PORT
    token: str | None = None
    token_file: str | None = None
    # seconds of simultaneous-open attempts before the lower rank listens instead
    punch_window_s: float = 2.0
    # seconds between connection attempts
    retry_interval_s: float = 0.02

    def resolved_token(self) -> str | None:
        """Return the shared secret, read from ``token_file`` when ``token`` is unset."""
        if self.token is not None or self.token_file is None:
            return self.token
        try:
            return Path(self.token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise InvalidParameterError(
                f"cannot read the rendezvous token file {self.token_file}: {exc}"
            ) from exc


@dataclass
class RedisSettings:
    """Redis server address and key prefix (keys are ``<prefix>:<comm_name>:...``)."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_REDIS_PORT
    db: int = 0
    password: str | None = None
    prefix: str = "fmi"
    # keys left behind by a crashed job expire after this many seconds
    key_ttl_s: int = 3600


@dataclass
class ObjectStoreSettings:
    """Store location (see ``cai_helpers.store.open_store``) and polling interval."""

    location: str = "data/store"
    endpoint_url: str | None = None
    prefix: str = "fmi"
    poll_interval_s: float = 0.05


@dataclass
class Timeouts:
    """Seconds to wait for a partner to pair (direct channel) and for one message."""

    pairing_s: float = 30.0
    io_s: float = 60.0


@dataclass
class PolicySettings:
    """Constants of the latency and price models, with prices in USD and sizes in bytes.

    The defaults are estimates from public AWS list prices (us-east-1, 2024) and
    loopback-to-in-region latencies. Replace them with measured values for a region.
    """

    message_bytes: int = 8192
    function_memory_mb: int = 2048
    lambda_gb_second_usd: float = 0.0000166667
    direct_overhead_s: float = 0.0002
    direct_bandwidth_bps: float = 500e6
    direct_server_hour_usd: float = 0.0
    redis_overhead_s: float = 0.0005
    redis_bandwidth_bps: float = 300e6
    redis_request_usd: float = 0.0
    redis_server_hour_usd: float = 0.034
    objectstore_overhead_s: float = 0.03
    objectstore_bandwidth_bps: float = 80e6
    objectstore_put_usd: float = 0.000005
    objectstore_get_usd: float = 0.0000004
    objectstore_server_hour_usd: float = 0.0
    transfer_gb_usd: float = 0.0


@dataclass
class FMIConfig:
    """Parsed communicator configuration."""

    direct: DirectSettings | None = None
    redis: RedisSettings | None = None
    objectstore: ObjectStoreSettings | None = None
    pin: str | None = None
    objective: str = "cheap"
    timeouts: Timeouts = field(default_factory=Timeouts)
    policy: PolicySettings = field(default_factory=PolicySettings)

    @property
    def enabled_channels(self) -> tuple[str, ...]:
        """Names of the configured channels, in the fixed tie-break order."""
        return tuple(name for name in CHANNEL_ORDER if getattr(self, name) is not None)

    def __post_init__(self) -> None:
        if not self.enabled_channels:
            raise InvalidParameterError(
                "FMI configuration enables no channel; add 'direct', 'redis' or "
                "'objectstore' under 'channels'"
            )
        if self.pin is not None and self.pin not in self.enabled_channels:
            raise InvalidParameterError(
                f"FMI configuration pins channel {self.pin!r}, which is not enabled; "
                f"enabled channels: {', '.join(self.enabled_channels)}"
            )
        if self.objective not in OBJECTIVES:
            raise InvalidParameterError(
                f"FMI objective {self.objective!r} is invalid; use 'fast' or 'cheap'"
            )
        if self.timeouts.pairing_s <= 0 or self.timeouts.io_s <= 0:
            raise InvalidParameterError(
                f"FMI timeouts must be positive, got {self.timeouts}"
            )


def _build(cls: type, values: Mapping[str, Any] | None, where: str) -> Any:
    values = dict(values or {})
    known = {item.name for item in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InvalidParameterError(
            f"unknown FMI setting(s) {unknown} under {where!r}; known: {sorted(known)}"
        )
    return cls(**values)


def load_config(config: Mapping[str, Any] | str | os.PathLike | FMIConfig) -> FMIConfig:
    """Parse a configuration dict, a JSON file path, or pass an FMIConfig through."""
    if isinstance(config, FMIConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        try:
            config = json.loads(Path(config).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidParameterError(f"cannot read FMI configuration {config}: {exc}") from exc
    if not isinstance(config, Mapping):
        raise InvalidParameterError(
            f"FMI configuration must be a dict or a JSON file path, not {type(config).__name__}"
        )

    top_level = {"channels", "pin", "objective", "timeouts", "policy"}
    unknown = sorted(set(config) - top_level)
    if unknown:
        raise InvalidParameterError(
            f"unknown FMI configuration key(s) {unknown}; known: {sorted(top_level)}"
        )
    channels = dict(config.get("channels") or {})
    unknown_channels = sorted(set(channels) - set(CHANNEL_ORDER))
    if unknown_channels:
        raise InvalidParameterError(
            f"unknown FMI channel(s) {unknown_channels}; use {', '.join(CHANNEL_ORDER)}"
        )

    settings_classes = {
        "direct": DirectSettings,
        "redis": RedisSettings,
        "objectstore": ObjectStoreSettings,
    }
    enabled = {
        name: _build(settings_classes[name], values, f"channels.{name}")
        for name, values in channels.items()
        if values is not None
    }
    return FMIConfig(
        **enabled,
        pin=config.get("pin"),
        objective=config.get("objective", "cheap"),
        timeouts=_build(Timeouts, config.get("timeouts"), "timeouts"),
        policy=_build(PolicySettings, config.get("policy"), "policy"),
    )
