"""The one way a server re-loads its certificates while it runs: a periodic, jittered refresh."""

from __future__ import annotations

from collections.abc import Callable

from runtime.secrets.loader import refresh_delays
from runtime.serving.server import Background, periodic


def certificate_refresh(seconds: float, refresh: Callable[[], object]) -> Background:
    """`refresh` every `seconds`, each wait 80-100 % of it (`loader.refresh_delay`): the tasks of one
    deploy spread their Secrets Manager calls, and none waits past the interval."""
    return periodic("certificate refresh", seconds, refresh, delay=refresh_delays(seconds))
