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


def is_public(address: IpAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    # is_global is false for private, loopback, link-local, CGNAT (100.64/10), unspecified and reserved ranges.
    return address.is_global and not address.is_multicast


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
