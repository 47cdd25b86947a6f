"""The vocabulary of config rules: what one value must be (``Rule``), common kinds of value, the error
that names the key (``check`` raises it), and the one cross-key rule several backbones share (a head reads
the backbone's outputs, ``head_reads_backbone_outputs``). ``gmmseg.config_validation`` says which key
follows which rule."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
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
    "check",
    "existing_file",
    "head_reads_backbone_outputs",
    "in_range",
    "integer",
    "lookup",
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


def _shown(value: Any) -> Any:
    """Sequences are reported as lists, whether the YAML gave a list or the command line a tuple."""
    return list(value) if isinstance(value, tuple) else value


def check(ok: bool, key: str, value: Any, expected: str) -> None:
    """ConfigValueError for ``key`` (its ``value`` and what was ``expected``) unless ``ok``."""
    if not ok:
        raise ConfigValueError(key, _shown(value), expected)


def lookup(cfg: Any, key: str) -> Any:
    """The value of a dotted key (``"MODEL.GMM.EMBED_DIM"``) in a config."""
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def head_reads_backbone_outputs(
    backbone: str, outputs_key: str, strides: Mapping[str, int], head: str
) -> Callable[[Any], None]:
    """The cross-key rule of a backbone that names its outputs (``outputs_key``, e.g.
    ``MODEL.MIT.OUT_FEATURES``): on that ``backbone`` the head reads some of them, and the stride of
    ``head`` (the backbone's own head, e.g. ``SegFormerHead``) is that of its finest input."""

    def rule(cfg: Any) -> None:
        if cfg.MODEL.BACKBONE.NAME != backbone:
            return
        head_cfg, outputs = cfg.MODEL.SEM_SEG_HEAD, list(lookup(cfg, outputs_key))
        check(
            len(head_cfg.IN_FEATURES) > 0 and set(head_cfg.IN_FEATURES) <= set(outputs),
            "MODEL.SEM_SEG_HEAD.IN_FEATURES",
            head_cfg.IN_FEATURES,
            f"names among {outputs_key} {outputs}",
        )
        if head_cfg.NAME == head:
            finest = min(strides[name] for name in head_cfg.IN_FEATURES)
            stride = head_cfg.COMMON_STRIDE
            check(stride == finest, "MODEL.SEM_SEG_HEAD.COMMON_STRIDE", stride, f"{finest} (finest input)")

    rule.__name__ = rule.__qualname__ = f"head_reads_{backbone}_outputs"
    rule.__doc__ = f"On {backbone} the head reads outputs it gives; {head}'s stride is its finest input's."
    return rule
