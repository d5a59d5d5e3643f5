"""Checks shared by the settings modules: each failure names the setting's full path.

`Where` is the path of one value in cdk.json (`hokusai:environments.staging.vpc.create.cidr`);
its checks return the value, converted, or raise `SettingsError` naming that path.
Pure Python, no aws-cdk-lib.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn


class SettingsError(ValueError):
    """A setting in cdk.json is missing, unknown or out of range."""


@dataclass(frozen=True)
class Where:
    """The dotted path of a setting, e.g. `Where("hokusai:environments.staging") / "vpc"`."""

    path: str

    def __truediv__(self, key: str) -> Where:
        return Where(f"{self.path}.{key}")

    def fail(self, problem: str) -> NoReturn:
        raise SettingsError(f"{self.path}: {problem}")

    def mapping(
        self, raw: object, *, allowed: Iterable[str], required: Iterable[str] = ()
    ) -> Mapping[str, Any]:
        """`raw` as an object whose keys are all `allowed` and include every `required` one."""
        allowed = tuple(allowed)
        if not isinstance(raw, Mapping):
            self.fail(f"expected an object, got {_kind(raw)}")
        unknown = sorted(set(raw) - set(allowed))
        if unknown:
            (self / unknown[0]).fail(f"unknown setting; expected {', '.join(allowed)}")
        for key in required:
            if key not in raw:
                (self / key).fail("missing")
        return raw

    def one_of_keys(self, raw: object, choices: Iterable[str]) -> tuple[str, Any]:
        """`{"create": {...}}` or `{"import": {...}}`: exactly one key of `choices`, and its value."""
        choices = tuple(choices)
        expected = " or ".join(f'{{"{choice}": ...}}' for choice in choices)
        if not isinstance(raw, Mapping) or len(raw) != 1 or next(iter(raw)) not in choices:
            self.fail(f"expected {expected}, got {raw!r}")
        key = next(iter(raw))
        return key, raw[key]

    def choice(self, raw: object, choices: Iterable[str]) -> str:
        choices = tuple(choices)
        if raw not in choices:
            self.fail(f"{raw!r} is not one of {', '.join(choices)}")
        return str(raw)

    def whole_number(self, raw: object, low: int, high: int, *, why: str = "") -> int:
        """`why`, if given, follows the range in the message (`: at most 4 per vCPU`)."""
        # bool is an int in Python; `true` in cdk.json is not a number.
        if not isinstance(raw, int) or isinstance(raw, bool):
            self.fail(f"{raw!r} is not a whole number")
        if not low <= raw <= high:
            self.fail(f"{raw} is outside {low}..{high}{why}")
        return raw

    def whole_number_in(self, raw: object, allowed: Container[int], what: str) -> int:
        """A whole number that is one of `allowed` (a tuple or a range); `what` says which they are."""
        if not isinstance(raw, int) or isinstance(raw, bool):
            self.fail(f"{raw!r} is not a whole number")
        if raw not in allowed:
            self.fail(f"{raw} is not {what}")
        return raw

    def number(self, raw: object, *, above: float, at_most: float) -> float:
        if not isinstance(raw, int | float) or isinstance(raw, bool):
            self.fail(f"{raw!r} is not a number")
        if not above < raw <= at_most:
            self.fail(f"{raw} must be more than {above:g} and at most {at_most:g}")
        return float(raw)

    def string(self, raw: object, pattern: re.Pattern[str], what: str) -> str:
        if not isinstance(raw, str) or not pattern.fullmatch(raw):
            self.fail(f"{raw!r} is not {what}")
        return raw

    def strings(
        self, raw: object, pattern: re.Pattern[str], what: str, *, min_items: int = 0
    ) -> tuple[str, ...]:
        """A list of strings matching `pattern`, without duplicates."""
        if not isinstance(raw, list):
            self.fail(f"expected a list, got {_kind(raw)}")
        if len(raw) < min_items:
            self.fail(f"needs at least {min_items} item(s)")
        items = tuple(
            Where(f"{self.path}[{index}]").string(item, pattern, what) for index, item in enumerate(raw)
        )
        if len(set(items)) != len(items):
            self.fail("lists an item twice")
        return items

    def cidr(self, raw: object, *, allow_everything: bool = False) -> str:
        """An IPv4 network in CIDR notation with no host bits set (`10.1.0.0/16`)."""
        if not isinstance(raw, str):
            self.fail(f"{raw!r} is not an IPv4 CIDR block such as '10.1.0.0/16'")
        try:
            network = ipaddress.IPv4Network(raw, strict=True)
        except ValueError as error:
            self.fail(f"{raw!r} is not an IPv4 CIDR block such as '10.1.0.0/16' ({error})")
        if network.prefixlen == 0 and not allow_everything:
            self.fail(f"{raw!r} would match every address")
        return str(network)

    def cidrs(self, raw: object) -> tuple[str, ...]:
        if not isinstance(raw, list):
            self.fail(f"expected a list of CIDR blocks, got {_kind(raw)}")
        items = tuple(Where(f"{self.path}[{index}]").cidr(item) for index, item in enumerate(raw))
        if len(set(items)) != len(items):
            self.fail("lists a CIDR block twice")
        return items


def _kind(raw: object) -> str:
    return "null" if raw is None else type(raw).__name__
