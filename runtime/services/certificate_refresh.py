"""The one way a server re-loads its certificates while it runs: a periodic, jittered refresh."""

from __future__ import annotations

from collections.abc import Callable

from cryptography import x509

from runtime.secrets.loader import check_refresh_interval, refresh_delays
from runtime.serving.server import Background, periodic


def certificate_refresh(
    seconds: float, refresh: Callable[[], object], certificate: x509.Certificate | None = None
) -> Background:
    """`refresh` every `seconds`, each wait 80-100 % of it (`loader.refresh_delay`): the tasks of one
    deploy spread their Secrets Manager calls, and none waits past the interval. `certificate`: the
    leaf loaded at start, to warn if the interval is too long for its life (`check_refresh_interval`)."""
    check_refresh_interval(seconds, certificate)
    return periodic("certificate refresh", seconds, refresh, delay=refresh_delays(seconds))
