"""The addresses of a pool across machines (docs/multi-machine.md), checked before any work and without torch
(socket and psutil only): the host's interface and secret file, and the address `tandem worker serve` listens on.

The host's pool listens on one interface, the one that reaches the other machines, so a pool with devices of other
machines needs it named (`host_settings`). A daemon's `--listen` is an address or a name this machine resolves to an
IPv4 address (`listen_address`); its workers' gloo/NCCL use the interface that holds that address, so a daemon that
listens on every interface (0.0.0.0) must be told which one with `--interface` (`serve_interface`).
"""

from __future__ import annotations

import ipaddress
import socket

from . import environment
from .pool_settings import INTERFACE, SECRET_FILE

HOST_INTERFACE = "interface=, TANDEM_INTERFACE or --interface"  # how a host names it, for refusals
EVERY_INTERFACE = "0.0.0.0"


def _ipv4(interfaces: dict) -> dict[str, list[str]]:
    """psutil.net_if_addrs()'s interfaces -> their IPv4 addresses (those without one left out)."""
    found = {name: [a.address for a in addrs if a.family == socket.AF_INET] for name, addrs in interfaces.items()}
    return {name: addresses for name, addresses in found.items() if addresses}


def interface_address(name: str, option: str = HOST_INTERFACE) -> str:
    """The IPv4 address of network interface `name`; a ValueError naming `option` and the interfaces with one
    otherwise."""
    import psutil

    interfaces = psutil.net_if_addrs()
    found = _ipv4(interfaces)
    if name in found:
        return found[name][0]
    problem = "has no IPv4 address" if name in interfaces else "does not exist"
    raise ValueError(f"network interface {name!r} ({option}) {problem} on this machine; interfaces with an IPv4 "
                     f"address: {', '.join(sorted(found)) or 'none'}")


def interface_of(address: str) -> str | None:
    """The network interface that holds IPv4 `address` (any loopback address: the loopback interface), or None."""
    import psutil

    found = _ipv4(psutil.net_if_addrs())
    loopback = ipaddress.ip_address(address).is_loopback
    return next((name for name, addresses in found.items() if address in addresses), None) or \
        next((name for name, addresses in found.items()
              if loopback and any(ipaddress.ip_address(a).is_loopback for a in addresses)), None)


def host_settings(machines: tuple[str, ...], secret_file: str | None, interface: str | None) -> tuple[str, str, bytes]:
    """The secret file, interface and secret of a pool whose devices name `machines` (other machines' HOST:PORT),
    each given or else from its TANDEM_* variable: both must be given, the interface must exist here with an IPv4
    address, the secret file must hold a secret. Raises ValueError in one sentence naming the setting; checks what
    a pool's start checks first, so a command can refuse before it loads a model."""
    from .secure import read_secret

    secret_file = environment.setting(SECRET_FILE, secret_file or None)
    interface = environment.setting(INTERFACE, interface or None)
    named = ", ".join(machines)
    if not secret_file:
        raise ValueError(f"devices name other machines ({named}): give the pool's shared secret file "
                         "(secret_file=, TANDEM_SECRET_FILE or --secret-file), the one their `tandem worker "
                         "serve --secret-file` reads")
    if not interface:
        raise ValueError(f"devices name other machines ({named}): give the network interface that reaches them "
                         f"({HOST_INTERFACE}, e.g. eth1); the pool listens only there")
    interface_address(interface)
    return secret_file, interface, read_secret(secret_file)


def listen_address(text: str) -> tuple[str, int]:
    """`tandem worker serve --listen`: "10.0.0.2:7000" -> ("10.0.0.2", 7000); a name (localhost:7000, box2:7000)
    resolved to its IPv4 address. A ValueError in one sentence naming --listen otherwise."""
    host, colon, port = str(text).rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port.isdigit() or not 0 <= int(port) < 65536:  # 0: a free port, logged
        raise ValueError(f"--listen {text!r}: give ADDRESS:PORT or NAME:PORT, e.g. 10.0.0.2:7000 (the address of the "
                         "interface the pool's machines share)")
    try:
        found = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ValueError(f"--listen {text!r}: {host!r} does not resolve to an IPv4 address on this machine "
                         f"({getattr(exc, 'strerror', None) or exc}); give the address of the interface the pool's "
                         "machines share, or a name that resolves to it") from None
    return found[0][4][0], int(port)


def serve_interface(host: str, port: int, interface: str | None) -> str:
    """The interface the workers of a daemon listening on `host` (an IPv4 address) use for gloo/NCCL: `interface`
    (which must exist here with an IPv4 address), else the one that holds `host`. Listening on 0.0.0.0 (every
    interface) needs `interface` named. A ValueError in one sentence naming the option otherwise."""
    if interface:
        interface_address(interface, "--interface")
        return interface
    if host == EVERY_INTERFACE:
        raise ValueError(f"--listen {host}:{port} listens on every interface, and the workers' gloo/NCCL need the "
                         "one the pool's machines share: name it with --interface NAME (e.g. eth1), or listen on "
                         "that interface's address")
    found = interface_of(host)
    if found is None:
        raise ValueError(f"--listen {host}:{port}: no network interface of this machine holds {host}; give the "
                         "address of the interface the pool's machines share (or --interface NAME)")
    return found
