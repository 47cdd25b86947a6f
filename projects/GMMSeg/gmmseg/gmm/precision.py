"""Float32 islands inside mixed-precision (autocast) regions.

The GMM's log-likelihoods are differences of large numbers (``-0.5 * sum_d (x_d - mu_d)^2 / s_d^2`` for
stds near 0.1 in 64 dims is in the hundreds, and the class decision reads differences of a few units), the
Sinkhorn E-step exponentiates them divided by ``epsilon`` = 0.05, and the memory's running sums and the
M-step accumulate thousands of features: float16 / bfloat16 (3 or 2 significant digits) would change
every one of them. Autocast would run their matrix products in the low dtype whatever the inputs' dtype,
so the core's entry points are wrapped in ``float32_region`` (autocast off) and promote their inputs to
at least float32 themselves (``compute_dtype``). Outside autocast the wrapper calls the function directly:
the float32 path is unchanged, bit for bit.
"""

from __future__ import annotations

import functools
from contextlib import ExitStack
from typing import Callable, TypeVar

import torch

__all__ = ["autocast_active", "float32_region"]

F = TypeVar("F", bound=Callable)

# the device types autocast may be enabled for (each has its own enable flag)
_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps")


def autocast_active() -> tuple[str, ...]:
    """The device types for which autocast is enabled here (empty outside any autocast region)."""
    return tuple(
        d for d in _DEVICE_TYPES if torch.amp.is_autocast_available(d) and torch.is_autocast_enabled(d)
    )


def float32_region(fn: F) -> F:
    """Decorator: run ``fn`` with autocast disabled for every device type where it is enabled, so its
    matrix products run in the dtype of their (float32) inputs; a plain call outside autocast."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        active = autocast_active()
        if not active:
            return fn(*args, **kwargs)
        with ExitStack() as stack:
            for device_type in active:
                stack.enter_context(torch.autocast(device_type, enabled=False))
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
