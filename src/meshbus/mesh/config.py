"""The routing protocol's timers, with their defaults; all in seconds.

Rules of this module: plain values, checked when built (a `ValueError` names the setting and the fix). The
TOML file's mesh settings (meshbus.config) map onto these names; nothing here reads files or clocks.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True, slots=True)
class MeshConfig:
    hello_interval: float = 0.5  # a hello on every inter-router link this often
    hello_timeout: float = 1.5  # a neighbour not heard from for this long is dead (three hellos missed)
    advertise_interval: float = 4.0  # each neighbour gets our database summary (RA) about this often
    batch_delay: float = 0.01  # route recomputes and our own updates wait this long so bursts go as one
    request_timeout: float = 1.0  # an unanswered request (LSR, MAR) may be repeated after this long
    purge_after: float = 30.0  # an unreachable router's state, not refreshed for this long, is forgotten

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            zero_allowed = item.name == "batch_delay"
            if not isinstance(value, int | float) or value < 0 or (value == 0 and not zero_allowed):
                bound = ">= 0" if zero_allowed else "> 0"
                raise ValueError(
                    f"mesh setting {item.name} must be a number of seconds {bound}, got {value!r}"
                )
        if self.hello_timeout < 2 * self.hello_interval:
            raise ValueError(
                f"mesh setting hello_timeout ({self.hello_timeout:g} s) must be at least twice "
                f"hello_interval ({self.hello_interval:g} s), or one late hello declares a neighbour dead: "
                "raise hello_timeout or lower hello_interval"
            )
