"""What every bench method shares: one way of metering a call, one registry of the methods.

    value, meter = metered(fn, *args)     # meter: wall and CPU seconds, energy, peak RSS (util.energy.Meter)
"""

from __future__ import annotations

from typing import Any

from read_cache.util.energy import Meter


def metered(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """Call `fn` under a Meter; returns (its value, the meter's reading as a dict)."""
    with Meter() as meter:
        value = fn(*args, **kwargs)
    return value, meter.reading.to_dict()
