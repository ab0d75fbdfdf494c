"""Where webhooks may be sent: public internet addresses only, so an agency's key cannot aim the service at
the operator's own network (internal services, the cloud metadata endpoint at 169.254.169.254, localhost).

Checked twice. At registration, a URL whose host is a localhost name or an IP literal that is not public is
refused. At delivery, which is the real protection since a name can resolve to anything and change after
registration (DNS rebinding): the webhook session's resolver drops every address that is not public from what
DNS returns and fails the connection when none is left; an IP literal, which aiohttp connects to without asking
the resolver, is checked just before sending.

The operator may allow networks (``PAYSVC_WEBHOOKS_ALLOWED_NETWORKS``, e.g. a government private network where
agencies' receivers sit), and ``PAYSVC_WEBHOOKS_ALLOW_INSECURE_LOCALHOST`` allows loopback (development, tests).
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")          # IPv6 addresses that a NAT64 gateway turns into IPv4
_SHARED = ipaddress.IPv4Network("100.64.0.0/10")        # carrier-grade NAT; ``is_private`` misses it
_PRIVATE = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))
_LEGACY_IPV4 = re.compile(r"[0-9a-fx.]+", re.IGNORECASE)  # 2130706433, 0x7f000001, 0177.0.0.1, 127.1


class Blocked(OSError):
    """A connection refused because no address of the host may be reached; ``strerror`` says why."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EACCES, message)


def parse_networks(raw: str) -> tuple[Network, ...]:
    """``"10.20.0.0/16, fd00:1::/48"`` → networks; a bad entry raises ``ValueError`` saying what to write."""
    networks = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part))
        except ValueError as exc:
            raise ValueError(f"{part!r} is not a network in CIDR form like 10.20.0.0/16 ({exc})") from None
    return tuple(networks)


def _unwrap(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv4-mapped (::ffff:a.b.c.d) or NAT64 (64:ff9b::a.b.c.d) address reaches."""
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def _kind(ip: IPAddress) -> str | None:
    """What ``ip`` is when it is not a public internet address, or ``None``."""
    if ip.is_loopback:
        return "a loopback address (the service's own machine)"
    if ip.is_link_local:
        return "a link-local address (where cloud metadata services answer)"
    if ip.is_unspecified:
        return "the unspecified address"
    if ip.is_multicast:  # ``is_global`` is true for most multicast
        return "a multicast address"
    if ip.version == 4 and ip in _SHARED:
        return "a shared (carrier-grade NAT) address"
    if any(ip in net for net in _PRIVATE):
        return "a private-network address"
    if not ip.is_global or ip.is_reserved or (ip.version == 6 and ip.is_site_local):
        return "not a public internet address"
    return None


@dataclass(frozen=True)
class Destinations:
    """Addresses deliveries may reach: public ones, those in ``allowed``, and loopback when ``allow_loopback``."""

    allowed: tuple[Network, ...] = ()
    allow_loopback: bool = False

    def refusal(self, ip: IPAddress) -> str | None:
        """Why deliveries may not go to ``ip`` (e.g. "10.0.0.1 is a private-network address"), or ``None``."""
        target = _unwrap(ip)
        if any(target in net for net in self.allowed) or (self.allow_loopback and target.is_loopback):
            return None
        sixtofour = target.sixtofour if target.version == 6 else None  # 2002:a.b.c.d::/48 reaches a.b.c.d
        for part in (target, sixtofour):
            kind = _kind(part) if part is not None else None
            if kind:
                return f"{ip} is {kind}" if part == ip else f"{ip} stands for {part}, {kind}"
        return None


def destinations_from_settings(settings) -> Destinations:
    return Destinations(parse_networks(settings.webhooks_allowed_networks),
                        allow_loopback=settings.webhooks_allow_insecure_localhost)


def literal_address(host: str) -> IPAddress | None:
    """The address ``host`` writes, in any form the C library would also read (127.1, 0x7f000001), or ``None``."""
    host = host.rstrip(".")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _LEGACY_IPV4.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            pass
    return None


_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def name_problem(name: str) -> str | None:
    """Why ``name`` (lower case, no trailing dot, not an address) is no host name a resolver could look up, or
    None. Found by a fuzz audit: ``https://.com/``, a 70-character label, a space or an all-digit last label
    were accepted, and each delivery then failed inside the resolver, where nothing recorded it."""
    try:
        ascii_name = name.encode("idna").decode("ascii")  # Unicode names as DNS carries them (xn--…)
    except UnicodeError:
        return f"{name!r} is not a host name (an empty label, or one longer than 63 characters)"
    labels = ascii_name.split(".")
    if len(ascii_name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return (f"{name!r} is not a host name: labels of letters, digits and inner hyphens, 1 to 63 characters "
                "each, 253 in all")
    if labels[-1].isdigit():
        return f"{name!r} is not a host name, nor an IP address (its last label is all digits)"
    return None


def host_refusal(url: str, destinations: Destinations) -> str | None:
    """Why ``url``'s host may not receive webhooks, judged without DNS (a name is judged at each delivery)."""
    try:
        host = URL(url).host  # what aiohttp will connect to (it folds forms like 127。0。0。1)
    except ValueError:
        return "the URL is not valid"
    if not host:
        return "the URL has no host"
    name = host.rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return None if destinations.allow_loopback else f"{host} names the service's own machine"
    ip = literal_address(name)
    if ip is None:
        return name_problem(name)
    why = destinations.refusal(ip)
    if ip.version == 4 and name != str(ip):  # 2130706433, 0x7f000001, 127.1: refused even when public
        return f"{host} is the IPv4 address {ip} written another way" + (f", and {why}" if why else
                                                                          f": write it as {ip}")
    return why


class GuardedResolver(AbstractResolver):
    """Resolves through ``inner`` (aiohttp's default resolver) and keeps only addresses ``destinations`` allow;
    raises ``Blocked`` when none is left. ``inner`` is injectable for tests."""

    def __init__(self, destinations: Destinations, inner: AbstractResolver | None = None) -> None:
        self.destinations = destinations
        self._inner = inner if inner is not None else DefaultResolver()

    def _refusal(self, address: str) -> str | None:
        try:
            return self.destinations.refusal(ipaddress.ip_address(address))
        except ValueError:
            return f"{address} is not an IP address"

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        kept, refused = [], {}
        for result in results:
            why = self._refusal(result["host"])
            if why is None:
                kept.append(result)
            else:
                refused[result["host"]] = why
        if not kept:
            why = "; ".join(refused.values()) or "no address at all"
            raise Blocked(f"not sent: {host} resolves only to addresses webhooks may not reach: {why}")
        return kept

    async def close(self) -> None:
        await self._inner.close()


def client_session(destinations: Destinations, *, resolver: AbstractResolver | None = None) -> aiohttp.ClientSession:
    """The webhook client: every name it resolves goes through ``GuardedResolver``. No proxies from the
    environment (``trust_env`` stays off). Make it inside the running event loop."""
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(destinations, resolver))
    return aiohttp.ClientSession(connector=connector, headers={"User-Agent": "paysvc-webhooks/1"})
