"""Numbers from the environment, checked once the same way: a bad value is refused with its name.

Every setting that is a count or a duration goes through here, so none of them can take `nan`,
`inf`, a negative or a word and go on (a refresh every -1 s is a busy loop against Secrets Manager).
ValueError, `NAME='value': expected ...`, which the CLI prints as `error [invalid-value]`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping


def seconds(environ: Mapping[str, str], variable: str, *, default: float, maximum: float) -> float:
    """`variable` as seconds, more than 0 and at most `maximum`; `default` when unset or blank."""
    raw = environ.get(variable, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= maximum):
        raise ValueError(f"{variable}={raw!r}: expected seconds, more than 0 and at most {maximum:g}")
    return value


def whole(
    environ: Mapping[str, str],
    variable: str,
    *,
    default: int,
    low: int,
    high: int,
    what: str = "a whole number",
) -> int:
    """`variable` as a whole number from `low` to `high`; `default` when unset or blank."""
    raw = environ.get(variable, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ValueError(f"{variable}={raw!r}: expected {what} from {low} to {high}")
    return value
