"""Where a request came from, without believing what the request says about itself.

The socket peer is a fact; `X-Forwarded-For` is a claim anyone can make. A forwarded
address counts only when the socket peer is one of our trusted proxies, and then we take
the right-most address that is not itself a trusted proxy (each proxy appends the peer it
saw, so everything left of that point was written by the client). "Internal" means the
resulting address is inside the configured internal CIDRs. Being internal never
authenticates anyone: it only decides which path and metrics a request gets.
"""

from __future__ import annotations

import functools
import ipaddress
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from runtime.names import ENV_INTERNAL_CIDRS, ENV_TRUSTED_PROXY_CIDRS

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str | Iterable[str], setting: str) -> tuple[Network, ...]:
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError as exc:
            raise ValueError(f"{setting}: {item!r} is not a CIDR ({exc})") from exc
    return tuple(networks)


@functools.lru_cache(maxsize=4096)
def _address(text: str | None):
    """The parsed address, or None. Cached: `ipaddress` costs microseconds, and a service sees
    the same few peers (the ALB's nodes, a handful of tasks) on every request."""
    try:
        return ipaddress.ip_address((text or "").strip())
    except ValueError:
        return None


@dataclass(frozen=True)
class AddressPolicy:
    internal: tuple[Network, ...]
    trusted_proxies: tuple[Network, ...] = ()

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> AddressPolicy:
        internal = environ.get(ENV_INTERNAL_CIDRS)
        if not internal:
            raise ValueError(f"{ENV_INTERNAL_CIDRS} is not set (the VPC CIDRs, comma-separated)")
        return cls(
            parse_networks(internal, ENV_INTERNAL_CIDRS),
            parse_networks(environ.get(ENV_TRUSTED_PROXY_CIDRS, ""), ENV_TRUSTED_PROXY_CIDRS),
        )

    def _trusted(self, address) -> bool:
        return address is not None and any(address in network for network in self.trusted_proxies)

    def client_address(self, peer: str | None, forwarded_for: Iterable[str] = ()) -> str | None:
        """The caller's address: the socket peer, or (behind our proxies) the right-most untrusted hop."""
        address = _address(peer)
        if not self._trusted(address):
            return str(address) if address else None
        hops = [h.strip() for value in forwarded_for for h in value.split(",")]
        for hop in reversed(hops):
            candidate = _address(hop)
            if candidate is None:
                return None  # a garbled chain: believe nothing in it
            if not self._trusted(candidate):
                return str(candidate)
        return str(address)  # every hop is one of our proxies

    def is_internal(self, address: str | None) -> bool:
        parsed = _address(address)
        return parsed is not None and any(parsed in network for network in self.internal)

    def peer_is_trusted_proxy(self, peer: str | None) -> bool:
        return self._trusted(_address(peer))
