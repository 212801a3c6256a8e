"""Channel choice per operation from a latency model and a price model.

Every input is known to every peer before the operation starts (world size, the
operation's name, the configured typical message size), so every peer picks the
same channel without talking. Receivers of a broadcast or scatter cannot know the
payload size in advance, which is why the models use ``message_bytes`` from the
configuration rather than the actual payload.

- latency(channel) = steps x (per-message overhead + bytes / bandwidth), with
  steps = ceil(log2(world_size)) for tree algorithms.
- price(channel) = requests + transfer + server time over the latency + every
  function's GB-second price while it waits for that latency.

``fast`` picks the lowest latency, ``cheap`` the lowest price. Ties break by the
fixed order direct, redis, objectstore.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cai_helpers.fmi.config import CHANNEL_ORDER, FMIConfig, PolicySettings

# operations that exchange about two messages per peer instead of one
_TWO_WAY_OPS = frozenset({"allreduce", "barrier", "scan"})
_BYTES_PER_GB = 1e9
_SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True)
class ChannelEstimate:
    """Modelled latency (seconds) and price (USD) of one operation on one channel."""

    channel: str
    latency_s: float
    price_usd: float


def estimate(channel: str, op: str, world_size: int, nbytes: int, config: FMIConfig) -> ChannelEstimate:
    """Model one operation of ``nbytes`` per message among ``world_size`` peers."""
    policy: PolicySettings = config.policy
    steps = math.ceil(math.log2(world_size)) if world_size > 1 else 0
    messages = (world_size - 1) * (2 if op in _TWO_WAY_OPS else 1)
    overhead = getattr(policy, f"{channel}_overhead_s")
    bandwidth = getattr(policy, f"{channel}_bandwidth_bps")
    latency = steps * (overhead + nbytes / bandwidth)

    # requests: object stores bill every PUT and every GET, polls included
    if channel == "objectstore":
        poll_interval = config.objectstore.poll_interval_s if config.objectstore else 1.0
        polls_per_message = max(1.0, latency / max(poll_interval, 1e-6))
        requests = messages * (policy.objectstore_put_usd + polls_per_message * policy.objectstore_get_usd)
    elif channel == "redis":
        requests = 2 * messages * policy.redis_request_usd
    else:
        requests = 0.0

    transfer = messages * nbytes / _BYTES_PER_GB * policy.transfer_gb_usd
    server = getattr(policy, f"{channel}_server_hour_usd") / _SECONDS_PER_HOUR * latency
    waiting = world_size * policy.function_memory_mb / 1024 * policy.lambda_gb_second_usd * latency
    return ChannelEstimate(channel, latency, requests + transfer + server + waiting)


def choose_channel(op: str, world_size: int, config: FMIConfig, objective: str | None = None) -> str:
    """Return the channel that ``op`` uses: the pinned one, else the model's best."""
    if config.pin is not None:
        return config.pin
    if len(config.enabled_channels) == 1:
        return config.enabled_channels[0]
    objective = objective or config.objective
    estimates = [
        estimate(name, op, world_size, config.policy.message_bytes, config)
        for name in config.enabled_channels
    ]

    def key(item: ChannelEstimate) -> tuple[float, int]:
        value = item.latency_s if objective == "fast" else item.price_usd
        return value, CHANNEL_ORDER.index(item.channel)

    return min(estimates, key=key).channel
