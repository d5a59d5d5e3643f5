"""Network namespaces for tests shaped like the ECS deployment: one host, one address per service.

In ECS every task has its own network interface and address in the VPC, and clients find
MLflow by its Cloud Map name. On the loopback every server shares 127.0.0.1, so "the socket
peer is the ALB", "the caller is internal" or "the client dialed mlflow.hokusai-<env>.local"
cannot be told apart from anything else. Here each role gets a Linux network namespace, wired
with a veth pair into one bridge on a private /24 (chosen at random, 10.231.X.0/24, unused on
this machine), its own address, loopback up, and its own hosts file: `ip netns exec NS`
bind-mounts `/etc/netns/NS/hosts` over `/etc/hosts`, so a process started in a namespace
resolves the Cloud Map name to the MLflow namespace's address by ordinary name resolution.

Two ways to run something in a namespace:

- `Namespace.popen(argv)` / `.run(argv)`: a process under `ip netns exec` (the hosts file applies);
- `Namespace.call(fn, *args)`: `fn` in a new thread that entered the namespace with `setns(2)`;
  sockets that thread (and threads it starts) creates live in the namespace. The hosts file
  does NOT apply there (it is a mount, and threads share the process's mounts): resolve by address.

The bridge gets the .1 address, so the test process in the root namespace can reach every
namespace directly. Traffic only ever goes to addresses of namespaces this module created.

Needs root and iproute2; `require_netns()` raises `NetnsUnavailable` with the reason otherwise
(the fixtures turn it into a test failure, never a skip). Names carry a random tag per run
(`hk-<tag>-<role>`, interfaces `hk<tag>...`, at most 15 characters); `Network.close()` removes
every namespace, veth, the bridge and every /etc/netns directory it made, and runs at exit too.
"""

from __future__ import annotations

import atexit
import ctypes
import ipaddress
import os
import random
import re
import secrets
import shutil
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = Path("/run/netns")
NETNS_ETC_DIR = Path("/etc/netns")
_libc = ctypes.CDLL(None, use_errno=True)


class NetnsUnavailable(RuntimeError):
    """This machine cannot create network namespaces for us (not root, no iproute2, no netns)."""


def require_netns() -> None:
    if os.geteuid() != 0:
        raise NetnsUnavailable(
            "the deployed-shape tests create network namespaces and must run as root "
            "(CI does); run them with sudo, or deselect them with -m 'not deployed'"
        )
    if shutil.which("ip") is None:
        raise NetnsUnavailable("`ip` (iproute2) is missing: apt-get install -y iproute2")
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=False)
    if probe.returncode != 0:
        raise NetnsUnavailable(f"`ip netns list` failed: {probe.stderr.strip()}")


def ip(*args: str, namespace: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    argv = ["ip", *(["-n", namespace] if namespace else []), *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")
    return result


def used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network this machine has an address or a route in."""
    text = ip("-4", "-o", "addr").stdout + ip("-4", "route", "show", "table", "all").stdout
    found = []
    for match in re.finditer(r"(\d+\.\d+\.\d+\.\d+(?:/\d+)?)", text):
        try:
            found.append(ipaddress.ip_network(match.group(1), strict=False))
        except ValueError:
            continue
    return found


def free_subnet(second_octet: int = 231, attempts: int = 64) -> ipaddress.IPv4Network:
    """A random 10.<second_octet>.X.0/24 that overlaps nothing on this machine."""
    used = used_networks()
    for _ in range(attempts):
        candidate = ipaddress.ip_network(f"10.{second_octet}.{random.randrange(256)}.0/24")
        if not any(candidate.overlaps(net) for net in used if net.prefixlen > 0):
            return candidate
    raise RuntimeError(f"no free 10.{second_octet}.x.0/24 found after {attempts} tries")


def _enter(name: str) -> None:
    """Move the calling THREAD into network namespace `name` (setns is per thread)."""
    fd = os.open(NETNS_RUN_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({name}): {os.strerror(errno)}")
    finally:
        os.close(fd)


@dataclass
class Namespace:
    """One host of the test VPC: a network namespace with one address on the bridge."""

    role: str
    name: str
    address: str

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *[str(a) for a in argv]]

    def popen(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """A process in this namespace (its hosts file applies); kwargs go to subprocess.Popen."""
        return subprocess.Popen(self.argv(argv), **kwargs)

    def run(self, argv: Sequence[str], *, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.argv(argv), timeout=timeout, check=False, **kwargs)

    def call(self, fn: Callable[..., Any], *args, timeout: float = 60, **kwargs) -> Any:
        """`fn(*args, **kwargs)` in a new thread inside this namespace; its result, or its exception.

        Threads `fn` starts stay in the namespace (a server's accept loop, say) and may outlive it.
        """
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                _enter(self.name)
                outcome["value"] = fn(*args, **kwargs)
            except BaseException as exc:  # handed to the caller
                outcome["error"] = exc

        thread = threading.Thread(target=target, name=f"netns-{self.role}", daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(
                f"{getattr(fn, '__name__', fn)} in namespace {self.role} took over {timeout} s"
            )
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")


@dataclass
class Network:
    """A bridge, its namespaces and their hosts files; `close()` (also at exit) removes them all."""

    hosts: Mapping[str, str] = field(default_factory=dict)
    """Extra names for every namespace's hosts file: name -> role (resolved to that role's address)."""
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    subnet: ipaddress.IPv4Network | None = None
    namespaces: dict[str, Namespace] = field(default_factory=dict)
    _links: list[str] = field(default_factory=list)
    _closed: bool = False

    @property
    def bridge(self) -> str:
        return f"hk{self.tag}br"

    @property
    def gateway(self) -> str:
        """The bridge's own address: how the test process (root namespace) reaches the namespaces."""
        return str(self.subnet.network_address + 1)

    def address(self, host: int) -> str:
        return str(self.subnet.network_address + host)

    def open(self, roles: Mapping[str, int]) -> Network:
        """Create the bridge and one namespace per role at .<host> of the subnet."""
        require_netns()
        atexit.register(self.close)
        self.subnet = self.subnet or free_subnet()
        ip("link", "add", self.bridge, "type", "bridge")
        self._links.append(self.bridge)
        ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for index, (role, host) in enumerate(roles.items()):
            self._add(index, role, self.address(host))
        for namespace in self.namespaces.values():
            self._write_hosts(namespace)
        return self

    def _add(self, index: int, role: str, address: str) -> Namespace:
        name = f"hk-{self.tag}-{role}"
        outside, inside = f"hk{self.tag}v{index}", f"hk{self.tag}p{index}"
        namespace = Namespace(role, name, address)
        self.namespaces[role] = namespace  # registered first: close() removes what exists
        ip("netns", "add", name)
        ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        self._links.append(outside)
        ip("link", "set", inside, "netns", name)
        ip("link", "set", outside, "master", self.bridge)
        ip("link", "set", outside, "up")
        ip("link", "set", "lo", "up", namespace=name)
        ip("link", "set", inside, "name", "eth0", namespace=name)
        ip("addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0", namespace=name)
        ip("link", "set", "eth0", "up", namespace=name)
        return namespace

    def _write_hosts(self, namespace: Namespace) -> None:
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
        lines += [f"{self.namespaces[role].address} {name}" for name, role in self.hosts.items()]
        directory = NETNS_ETC_DIR / namespace.name
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "hosts").write_text("\n".join(lines) + "\n")

    def __getitem__(self, role: str) -> Namespace:
        return self.namespaces[role]

    def close(self) -> None:
        """Remove everything this network created; safe to call twice and after a failed open()."""
        if self._closed:
            return
        self._closed = True
        for namespace in self.namespaces.values():
            ip("netns", "del", namespace.name, check=False)
            shutil.rmtree(NETNS_ETC_DIR / namespace.name, ignore_errors=True)
        for link in reversed(self._links):  # deleting a namespace deletes its veth pair; the rest here
            if ip("link", "show", link, check=False).returncode == 0:
                ip("link", "del", link, check=False)
        atexit.unregister(self.close)

    def leftovers(self) -> list[str]:
        """What of ours still exists (for a test of the teardown itself)."""
        found = [n.name for n in self.namespaces.values() if (NETNS_RUN_DIR / n.name).exists()]
        found += [
            str(NETNS_ETC_DIR / n.name) for n in self.namespaces.values() if (NETNS_ETC_DIR / n.name).exists()
        ]
        found += [link for link in self._links if ip("link", "show", link, check=False).returncode == 0]
        return found
