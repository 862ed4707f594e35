"""Up-front checks of numeric settings (one clear ValueError naming the setting, before any work or file write) and
the error of a missing optional dependency."""

from __future__ import annotations

import math
from collections.abc import Iterable


def check_number(name: str, value: float, minimum: float | None = None, *, above: bool = False) -> None:
    """Refuse `value` unless it is a finite number (NaN would silently switch e.g. guidance off) that is at least
    `minimum` (with `above`: greater than it). `name` is how the user set it: an option or a config field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and (value <= minimum if above else value < minimum):
        raise ValueError(f"{name} must be {'>' if above else '>='} {minimum:g}, got {value!r}")


def check_numbers(
    values: Iterable[tuple[str, float | None]], minimum: float | None = None, *, above: bool = False
) -> None:
    """`check_number` on each (name, value) pair; None means unset and is skipped."""
    for name, value in values:
        if value is not None:
            check_number(name, value, minimum, above=above)


class MissingDependency(ImportError):
    """An optional dependency (one of lesa's extras) is not installed: the user's to fix, so the CLI reports it in one
    line, where any other ImportError is a bug and keeps its traceback."""
