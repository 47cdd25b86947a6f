"""The vocabulary of config rules: what one value must be (``Rule``), common kinds of value, and the error
that names the key. ``gmmseg.config_validation`` says which key follows which rule."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BOOLEAN",
    "DEVICE",
    "FRACTION",
    "HEIGHT_WIDTH",
    "POSITIVE",
    "ConfigValueError",
    "Rule",
    "at_least",
    "existing_file",
    "in_range",
    "integer",
    "one_of",
]


class ConfigValueError(ValueError):
    """An invalid config value; the message starts with the full key."""

    def __init__(self, key: str, value: Any, expected: str) -> None:
        super().__init__(f"{key} = {value!r} is invalid: expected {expected}")
        self.key = key


@dataclass(frozen=True)
class Rule:
    """What one key's value must be: ``accepts(value)``, and ``expected``, the text of the error."""

    accepts: Callable[[Any], bool]
    expected: str


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float))


def integer(minimum: int, note: str = "") -> Rule:
    """An int >= ``minimum``; ``note`` says what a special value means."""
    text = f"an integer >= {minimum}" + (f" ({note})" if note else "")
    return Rule(lambda v: isinstance(v, int) and v >= minimum, text)


def at_least(minimum: float) -> Rule:
    return Rule(lambda v: _is_number(v) and v >= minimum, f"a number >= {minimum}")


def in_range(low: float, high: float, low_open: bool = False) -> Rule:
    """A number in [low, high], or (low, high] with ``low_open``."""
    return Rule(
        lambda v: _is_number(v) and (low < v if low_open else low <= v) and v <= high,
        f"a number in {'(' if low_open else '['}{low}, {high}]",
    )


def one_of(*options: str) -> Rule:
    names = [repr(o) for o in options]
    text = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    return Rule(lambda v: v in options, text)


def existing_file(tool: str) -> Rule:
    """Empty (not used) or a file that ``tools/<tool>`` writes."""
    return Rule(lambda v: not v or os.path.isfile(v), f"an existing file (tools/{tool} writes it)")


def _is_positive_int_pair(value: Any) -> bool:
    return len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value)


POSITIVE = Rule(lambda v: _is_number(v) and v > 0, "a positive number")
FRACTION = Rule(lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)")  # a drop probability
BOOLEAN = Rule(lambda v: isinstance(v, bool), "True or False")
DEVICE = Rule(lambda v: isinstance(v, str) and (v == "cpu" or v.startswith("cuda")), "'cpu' or 'cuda[:N]'")
HEIGHT_WIDTH = Rule(_is_positive_int_pair, "two positive integers (height, width)")
