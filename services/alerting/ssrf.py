"""Whether a webhook URL targets a public address. Checked when an alert is saved; delivery checks the
address it actually connects to again (a name can resolve differently later: DNS rebinding)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
RESOLVE_TIMEOUT_SECONDS = 3.0


def literal_address(host: str) -> IpAddress | None:
    """``host`` as an IP address when it is one in any form a resolver accepts: dotted, IPv6 (also
    IPv4-mapped), and the integer, hex and octal spellings (``2130706433``, ``0x7f000001``, ``0177.1``)."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        # inet_aton is the classic parser behind those encodings: what an HTTP client would connect to.
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


# DNS64 gateways hand out these for IPv4-only names: where the connection ends is the embedded address.
NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")
SHARED_ADDRESS_SPACE = ipaddress.IPv4Network("100.64.0.0/10")


def _embedded_ipv4(address: IpAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (IPv4-mapped, NAT64, 6to4), where the packets really go."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in NAT64_PREFIX:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def _range_name(address: IpAddress) -> str | None:
    # Most specific first: 127.0.0.1 is also "private" and "not global", loopback is what a reader needs.
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "site-local (fec0::/10)"
    if address.is_multicast:
        return "multicast"
    if isinstance(address, ipaddress.IPv4Address) and address in SHARED_ADDRESS_SPACE:
        return "shared address space (CGNAT)"
    if address.is_private:
        return "private"
    if address.is_reserved:
        return "reserved"
    if not address.is_global:
        return "not globally routable"
    return None


def address_problem(address: IpAddress) -> str | None:
    """Why a connection to ``address`` must not be made for a webhook (``"address 127.0.0.1 is loopback"``),
    or None for a public address."""
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        kind = _range_name(embedded)
        if kind is not None:
            return f"address {address} ({embedded}) is {kind}"
        if isinstance(address, ipaddress.IPv6Address) and (address.ipv4_mapped is not None or address in NAT64_PREFIX):
            # Judged by where it leads: NAT64's prefix is "reserved" itself, yet carries the whole public IPv4 net.
            return None
    kind = _range_name(address)
    return None if kind is None else f"address {address} is {kind}"


def is_public(address: IpAddress) -> bool:
    return address_problem(address) is None


async def private_target(url: str) -> str | None:
    """Why ``url`` may not be a webhook target (its host is, or resolves to, a non-public address), or None.

    A name that does not resolve now is accepted: it can't be judged yet, and delivery checks the address
    it connects to."""
    host = urlsplit(url).hostname or ""
    literal = literal_address(host)
    if literal is not None:
        return None if is_public(literal) else f"{host} is not a public address"
    if host.rstrip(".").lower() == "localhost" or host.rstrip(".").lower().endswith(".localhost"):
        return f"{host} is a loopback name"
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT_SECONDS):
            infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError, ValueError):
        return None
    for info in infos:
        resolved = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not is_public(resolved):
            return f"{host} resolves to {resolved}, not a public address"
    return None
