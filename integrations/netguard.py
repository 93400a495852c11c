"""The one guarded path for every outbound connection to an MCP server.

An MCP server URL is typed in by an administrator, and the server behind it is
not trusted. Without a guard, Toolgate could be pointed at its own internals:
``http://127.0.0.1:6379/``, the cloud metadata service at ``169.254.169.254``,
or a LAN address. This module has three layers:

* ``validate_url`` - save-time checks on the URL's shape (scheme, host, no
  control characters). It does not resolve DNS: an answer given at save time
  proves nothing about the answer given at connect time.
  ``refusal_at_save`` resolves the host once at save time and applies the
  connect-time check to the answer, so a form can say at once that a host is
  private; it is advice for the admin, not the boundary.
* ``is_refused`` / ``parse_ip_literal`` - the address policy, and a parser that
  reads numeric hosts the way libc does (``http://2130706433/`` is 127.0.0.1).
* ``guarded_client`` - an ``httpx2.AsyncClient`` whose network backend resolves
  the host itself, refuses the connection if any answer is a refused address,
  and then connects to the vetted IP address, never to the hostname again. That
  closes the DNS-rebinding gap (a first answer that is public, a second that is
  127.0.0.1). TLS still verifies the certificate against the URL's hostname:
  httpcore2 passes the origin's host, not the address we connected to, as
  ``server_hostname`` to ``start_tls``. It can also cap the size of responses.

How a caller tells a policy refusal from an ordinary failure: requests through
``guarded_client`` raise ``AddressRefused``, which *is* an
``httpx2.ConnectError`` (so existing ``except httpx2.ConnectError`` /
``httpx2.TransportError`` handlers still catch it) but can be caught on its own.
Where an exception has been wrapped on the way up (by an anyio task group's
``ExceptionGroup``, or re-raised ``from`` it), use ``find_refusal(exc)``.

This module deliberately imports nothing from Django, so the transport layer and
Celery workers can use it without an app registry.
"""

from __future__ import annotations

import concurrent.futures
import functools
import ipaddress
import socket
import ssl
import unicodedata
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable

import anyio
import httpcore2
import httpx2

__all__ = [
    "AddressRefused",
    "GuardedNetworkBackend",
    "PlainHttpRefused",
    "ResponseTooLarge",
    "UrlRefused",
    "find_refusal",
    "guarded_client",
    "guarded_client_factory",
    "is_refused",
    "parse_ip_literal",
    "parse_networks",
    "refusal_at_save",
    "resolve_host",
    "validate_url",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The MCP SDK's own defaults (mcp.shared._httpx_utils): 30 s for connect/write/pool,
# 300 s to read, because a server may hold an event stream open between messages.
DEFAULT_TIMEOUT = httpx2.Timeout(30.0, read=300.0)

_PRIVATE_NOT_ALLOWED = "private network addresses are not allowed for this server"
_BLOCKED_FOR_ALL = "this address range is blocked for every server"


# --------------------------------------------------------------------------- errors


class UrlRefused(ValueError):
    """The URL cannot be saved as an MCP server URL; the message is meant for the admin form."""


class PlainHttpRefused(UrlRefused):
    """An http:// URL for a server that doesn't allow plain HTTP (the admin can allow it)."""


class AddressRefused(httpx2.ConnectError, httpcore2.ConnectError):
    """A connection was refused by policy, before any byte was sent.

    It subclasses both ConnectErrors: httpcore2's, so the connection pool treats
    it as a failed connect, and httpx2's, so callers' existing connect-error
    handling still applies. The message names only the host, the refused address
    and the reason - never the other addresses the name resolved to.
    """

    def __init__(self, host: str, address: IPAddress, reason: str, why: str) -> None:
        self.host = host
        self.address = address
        self.reason = reason
        self.why = why
        super().__init__(f"refused to connect to {address} ({reason}) for host {host}: {why}")

    def __reduce__(self):  # keep the exception picklable despite the custom __init__
        return (type(self), (self.host, self.address, self.reason, self.why))

    @property
    def blocked_for_every_server(self) -> bool:
        """Refused by ``extra_blocked``, which no per-server option overrides."""
        return self.why == _BLOCKED_FOR_ALL


class ResponseTooLarge(httpx2.TransportError):
    """A response body was longer than the client's ``max_response_bytes``."""

    def __init__(self, limit: int, *, request: httpx2.Request | None = None) -> None:
        self.limit = limit
        super().__init__(f"response body exceeds the limit of {limit} bytes", request=request)

    def __reduce__(self):
        return (type(self), (self.limit,))


def find_refusal(exc: BaseException) -> AddressRefused | None:
    """The ``AddressRefused`` inside ``exc``, looking through exception groups and chains.

    The MCP SDK runs requests in anyio task groups, so a refusal can reach the
    caller wrapped in an ``ExceptionGroup``, or as the cause of another error.
    """
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, AddressRefused):
            return current
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return None


# --------------------------------------------------------------------------- address policy

_IPV4_RANGES: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(cidr), reason)
    for cidr, reason in (
        ("0.0.0.0/8", "this network (0.0.0.0/8)"),
        ("127.0.0.0/8", "loopback"),
        ("10.0.0.0/8", "private network (RFC 1918)"),
        ("172.16.0.0/12", "private network (RFC 1918)"),
        ("192.168.0.0/16", "private network (RFC 1918)"),
        ("169.254.0.0/16", "link-local / cloud metadata"),
        ("100.64.0.0/10", "carrier-grade NAT"),
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("240.0.0.0/4", "reserved"),
    )
)

_IPV6_RANGES: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(cidr), reason)
    for cidr, reason in (
        ("fc00::/7", "IPv6 unique local"),
        ("fe80::/10", "IPv6 link-local"),
        ("fec0::/10", "IPv6 site-local (deprecated)"),
        ("ff00::/8", "multicast"),
        # Teredo tunnels to an arbitrary IPv4 host behind NAT; no legitimate server lives there.
        ("2001::/32", "Teredo tunnel"),
        ("3fff::/20", "reserved"),  # documentation (RFC 9637); Python 3.11 thinks it is global
    )
)

_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL_USE = ipaddress.ip_network("64:ff9b:1::/48")
_GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")


def _ipv4_reason(addr: ipaddress.IPv4Address) -> str | None:
    for network, reason in _IPV4_RANGES:
        if addr in network:
            return reason
    # Documentation, benchmarking and IETF protocol ranges: nothing to talk to there.
    return None if addr.is_global else "reserved"


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address | None] | None:
    """For IPv6 forms that carry an IPv4 destination: (form name, that IPv4 address).

    The IPv4 part is None for a local-use NAT64 address whose layout we can't
    tell (RFC 6052 allows several); such an address is refused outright.
    Returns None for IPv6 addresses that carry no IPv4 destination.
    """
    low32 = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr.ipv4_mapped is not None:
        return "IPv4-mapped", addr.ipv4_mapped
    if addr in _IPV4_COMPATIBLE and int(addr) > 1:  # but not :: or ::1
        return "IPv4-compatible", low32
    if addr in _NAT64_WELL_KNOWN:
        return "NAT64", low32
    if addr in _NAT64_LOCAL_USE:
        middle_bits = (int(addr) >> 32) & ((1 << 48) - 1)
        return "local-use NAT64", (low32 if middle_bits == 0 else None)
    if addr.sixtofour is not None:
        return "6to4", addr.sixtofour
    return None


def _ipv6_reason(addr: ipaddress.IPv6Address) -> str | None:
    if addr == ipaddress.IPv6Address("::1"):
        return "loopback"
    if addr == ipaddress.IPv6Address("::"):
        return "unspecified address (::)"
    embedded = _embedded_ipv4(addr)
    if embedded is not None:
        form, ipv4 = embedded
        if ipv4 is None:
            return f"{form} (64:ff9b:1::/48)"
        reason = _ipv4_reason(ipv4)
        return f"{reason}, via {form} {ipv4}" if reason else None
    for network, reason in _IPV6_RANGES:
        if addr in network:
            return reason
    if addr not in _GLOBAL_UNICAST_V6 or not addr.is_global:
        return "reserved"
    return None


def _builtin_reason(addr: IPAddress) -> str | None:
    """Why the built-in policy refuses ``addr`` (which must carry no zone id), or None."""
    if isinstance(addr, ipaddress.IPv4Address):
        return _ipv4_reason(addr)
    return _ipv6_reason(addr)


def _without_zone(addr: IPAddress) -> IPAddress:
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id:
        return ipaddress.IPv6Address(int(addr))
    return addr


def _destinations(addr: IPAddress) -> list[IPAddress]:
    """``addr`` and, for IPv6 forms that embed one, the IPv4 address it really reaches."""
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(addr)
        if embedded is not None and embedded[1] is not None:
            return [addr, embedded[1]]
    return [addr]


def parse_networks(ranges: Iterable[str | IPNetwork]) -> tuple[IPNetwork, ...]:
    """Parse CIDR strings ("10.0.0.0/8", "2001:db8::/32", or a bare address) strictly.

    Host bits set ("10.0.0.1/8") are an error rather than silently widened, so a
    typo in a deny-list is noticed.
    """
    if isinstance(ranges, str):
        raise TypeError("expected an iterable of CIDR strings, not a single string")
    networks = []
    for item in ranges:
        if isinstance(item, ipaddress.IPv4Network | ipaddress.IPv6Network):
            networks.append(item)
        else:
            networks.append(ipaddress.ip_network(str(item).strip()))
    return tuple(networks)


def _blocked_reason(addr: IPAddress, blocked: tuple[IPNetwork, ...]) -> str | None:
    for destination in _destinations(addr):
        for network in blocked:
            if destination in network:
                return f"in blocked range {network}"
    return None


def _refusal_reason(
    addr: IPAddress, blocked: tuple[IPNetwork, ...], allowed: tuple[IPNetwork, ...]
) -> str | None:
    reason = _blocked_reason(addr, blocked)
    if reason is not None:
        return reason
    if any(destination in network for destination in _destinations(addr) for network in allowed):
        return None
    return _builtin_reason(addr)


def _as_address(ip: str | IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return _without_zone(ip)
    parsed = parse_ip_literal(ip)
    if parsed is None:
        raise ValueError(f"{ip!r} is not an IP address")
    return _without_zone(parsed)


def is_refused(
    ip: str | IPAddress,
    *,
    extra_blocked: Iterable[str | IPNetwork] = (),
    extra_allowed: Iterable[str | IPNetwork] = (),
) -> str | None:
    """Why a connection to ``ip`` is refused (a short phrase for people), or None if it is public.

    Precedence, strongest first:

    1. ``extra_blocked`` - refused, whatever else says.
    2. ``extra_allowed`` - allowed, overriding the built-in list only.
    3. The built-in list: loopback, RFC 1918, link-local and cloud metadata,
       carrier-grade NAT, 0.0.0.0/8, multicast, broadcast and reserved ranges,
       IPv6 loopback/unspecified/ULA/link-local/site-local/multicast, Teredo,
       and anything outside IPv6 global unicast.

    IPv6 forms that reach an IPv4 host (IPv4-mapped, IPv4-compatible, NAT64,
    6to4) are judged by that IPv4 address, and the extra ranges are matched
    against both the IPv6 address and the IPv4 address inside it.

    ``ip`` may be an ``ipaddress`` object or a string in any form
    ``parse_ip_literal`` accepts ("0x7f.1" is loopback).
    """
    addr = _as_address(ip)
    return _refusal_reason(addr, parse_networks(extra_blocked), parse_networks(extra_allowed))


# --------------------------------------------------------------------------- host parsing


_DIGITS = {16: "0123456789abcdefABCDEF", 10: "0123456789", 8: "01234567"}


def _inet_aton_part(text: str) -> int | None:
    """One dot-separated part as libc reads it: 0x.. hex, 0.. octal, else decimal."""
    if text[:2].lower() == "0x":
        digits, base = text[2:], 16
    elif len(text) > 1 and text.startswith("0"):
        digits, base = text[1:], 8
    else:
        digits, base = text, 10
    if not digits or any(ch not in _DIGITS[base] for ch in digits):
        return None
    return int(digits, base)


def _parse_inet_aton(text: str) -> ipaddress.IPv4Address | None:
    """IPv4 in every form glibc's inet_aton accepts: "127.1", "2130706433", "0177.0.0.1".

    With n parts, the first n-1 are one byte each and the last fills the
    remaining 4-(n-1) bytes. This matters because getaddrinfo() accepts these
    forms too, so "http://0x7f.1/" really does connect to 127.0.0.1.
    """
    parts = text.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values = [_inet_aton_part(part) for part in parts]
    if any(value is None for value in values):
        return None
    *leading, last = values
    last_bytes = 4 - len(leading)
    if any(value > 0xFF for value in leading) or last >= 1 << (8 * last_bytes):
        return None
    number = 0
    for value in leading:
        number = (number << 8) | value
    return ipaddress.IPv4Address((number << (8 * last_bytes)) | last)


def parse_ip_literal(host: str) -> IPAddress | None:
    """The IP address ``host`` spells, or None if it is a name to resolve.

    Accepts what the OS resolver would treat as a literal: dotted IPv4 and the
    libc shorthands (decimal, hex, octal, fewer than four parts), IPv6 with or
    without brackets, and IPv6 zone ids ("fe80::1%eth0", or "%25eth0" as it is
    written inside a URL). An IPv6 result keeps its zone id.
    """
    text = host.strip() if isinstance(host, str) else ""
    if not text or text != host:
        return None
    bracketed = text.startswith("[") and text.endswith("]")
    if bracketed:
        text = text[1:-1]
    if "[" in text or "]" in text:
        return None
    if ":" in text:
        text = text.replace("%25", "%", 1)
        try:
            return ipaddress.IPv6Address(text)
        except ValueError:
            return None
    return None if bracketed else _parse_inet_aton(text)


# --------------------------------------------------------------------------- save-time URL check


def validate_url(url: str, *, allow_http: bool) -> None:
    """Check an MCP server URL before it is saved; raise ``UrlRefused`` with a message for the form.

    Only the URL's shape is checked: scheme, a host, no spaces, control
    characters or backslashes (parsers disagree about those), no credentials in
    the URL (they would be stored and logged in clear, and "https://good@evil"
    misleads readers). DNS is not resolved here: addresses are judged at connect
    time, by ``guarded_client``, where the answer actually gets used.
    """
    if not isinstance(url, str) or not url:
        raise UrlRefused("Enter a URL.")
    if any(ch.isspace() or unicodedata.category(ch) == "Cc" for ch in url):
        raise UrlRefused("The URL must not contain spaces or control characters.")
    if "\\" in url:
        raise UrlRefused("The URL must not contain backslashes.")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UrlRefused(f"This is not a valid URL ({exc}).") from None
    schemes = ("https", "http") if allow_http else ("https",)
    if parts.scheme.lower() not in schemes:
        if allow_http:
            raise UrlRefused("The URL must start with https:// or http://.")
        refusal = PlainHttpRefused if parts.scheme.lower() == "http" else UrlRefused
        raise refusal("The URL must start with https:// (plain http is not allowed).")
    if not parts.hostname:
        raise UrlRefused("The URL must include a host name.")
    if parts.username is not None or parts.password is not None:
        raise UrlRefused(
            "The URL must not contain a user name or password; "
            "configure the server's credentials separately."
        )
    if port == 0:
        raise UrlRefused("The URL's port must be between 1 and 65535.")
    try:
        httpx2.URL(url)  # the client must be able to request exactly this URL
    except httpx2.InvalidURL as exc:
        raise UrlRefused(f"This is not a valid URL ({exc}).") from None


SAVE_TIME_RESOLVE_TIMEOUT = 3.0  # seconds a form waits for DNS before giving no verdict
# Lookups run here so that a resolver that hangs holds one of these threads, never the request
# (it waits at most SAVE_TIME_RESOLVE_TIMEOUT); more hung lookups than threads just queue.
_save_time_resolvers = concurrent.futures.ThreadPoolExecutor(
    max_workers=4, thread_name_prefix="netguard-save-time-dns"
)


def refusal_at_save(
    url: str,
    *,
    allow_private_network: bool,
    extra_blocked: Iterable[str | IPNetwork] = (),
    extra_allowed: Iterable[str | IPNetwork] = (),
    timeout: float = SAVE_TIME_RESOLVE_TIMEOUT,
) -> AddressRefused | None:
    """The refusal the connect-time guard would give ``url``'s host today, or None.

    For a form to say, when the server is saved, that its host is private (or in a range
    blocked for every server) instead of letting the first sync find out. The host is
    resolved once (``resolve_host``) and every answer goes through the same check as at
    connect time (``GuardedNetworkBackend.check``). A host that doesn't resolve, or not
    within ``timeout``, gets no verdict: the sync reports it. This is advice only: DNS can
    answer differently later, and the connect-time guard stays the boundary.
    """
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    backend = GuardedNetworkBackend(
        allow_private_network=allow_private_network,
        extra_blocked=extra_blocked,
        extra_allowed=extra_allowed,
    )
    literal = parse_ip_literal(host)
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    addresses = [literal] if literal is not None else _resolve_now(host, port, timeout)
    for address in addresses:
        try:
            backend.check(host, address)
        except AddressRefused as refusal:
            return refusal
    return None


def _resolve_now(host: str, port: int, timeout: float) -> list[IPAddress]:
    """``resolve_host`` from synchronous code, giving up after ``timeout``; [] on any failure."""
    if not host:
        return []
    future = _save_time_resolvers.submit(anyio.run, resolve_host, host, port)
    try:
        return future.result(timeout=timeout)
    except Exception:  # unresolvable, timed out, or a name the resolver can't encode
        return []


# --------------------------------------------------------------------------- connect-time guard


async def resolve_host(host: str, port: int) -> list[IPAddress]:
    """All addresses the OS resolver gives for ``host``, in its order of preference, deduplicated.

    A module-level function so tests can replace it.
    """
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[IPAddress] = []
    for family, _type, _proto, _canonname, sockaddr in infos:
        if family == socket.AF_INET:
            address: IPAddress = ipaddress.IPv4Address(sockaddr[0])
        elif family == socket.AF_INET6:
            address = _ipv6_from_sockaddr(sockaddr)
        else:
            continue
        if address not in addresses:
            addresses.append(address)
    return addresses


def _ipv6_from_sockaddr(sockaddr: tuple) -> ipaddress.IPv6Address:
    """An IPv6 answer as an address, keeping a non-zero scope id as its zone.

    anyio hands back 2-tuples ``(host, port)`` with the scope id already appended to the
    host as ``%scope``; ``socket.getaddrinfo`` gives ``(host, port, flowinfo, scope_id)``.
    """
    host = str(sockaddr[0])
    if len(sockaddr) >= 4 and sockaddr[3] and "%" not in host:
        host = f"{host}%{sockaddr[3]}"
    return ipaddress.IPv6Address(host)


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    remaining = deadline - anyio.current_time()
    if remaining <= 0:
        raise httpcore2.ConnectTimeout("timed out while connecting")
    return remaining


class GuardedNetworkBackend(httpcore2.AsyncNetworkBackend):
    """An httpcore2 network backend that vets every address before connecting to it.

    ``connect_tcp`` resolves the host once, refuses if any answer is refused
    (so a name with one public and one private address is refused too), then
    hands the vetted IP address - not the name - to the wrapped backend. TLS is
    layered on afterwards by httpcore2 with ``server_hostname`` set to the
    URL's host, so certificate checks are unaffected.

    With ``allow_private_network`` the built-in list is not applied, but
    ``extra_blocked`` still is.
    """

    def __init__(
        self,
        *,
        allow_private_network: bool,
        extra_blocked: Iterable[str | IPNetwork] = (),
        extra_allowed: Iterable[str | IPNetwork] = (),
        inner: httpcore2.AsyncNetworkBackend | None = None,
    ) -> None:
        self._allow_private_network = allow_private_network
        self._blocked = parse_networks(extra_blocked)
        self._allowed = parse_networks(extra_allowed)
        self._inner = inner if inner is not None else httpcore2.AnyIOBackend()

    def check(self, host: str, address: IPAddress) -> None:
        """Raise ``AddressRefused`` if this backend must not connect to ``address``."""
        plain = _without_zone(address)
        reason = _blocked_reason(plain, self._blocked)
        if reason is not None:
            raise AddressRefused(host, address, reason, _BLOCKED_FOR_ALL)
        if self._allow_private_network:
            return
        reason = _refusal_reason(plain, (), self._allowed)
        if reason is not None:
            raise AddressRefused(host, address, reason, _PRIVATE_NOT_ALLOWED)

    async def _addresses(self, host: str, port: int, deadline: float | None) -> list[IPAddress]:
        literal = parse_ip_literal(host)
        if literal is not None:
            return [literal]
        try:
            with anyio.fail_after(_remaining(deadline)):
                addresses = await resolve_host(host, port)
        except TimeoutError:
            raise httpcore2.ConnectTimeout(f"timed out resolving {host}") from None
        except (OSError, UnicodeError) as exc:
            raise httpcore2.ConnectError(f"could not resolve {host}: {exc}") from exc
        if not addresses:
            raise httpcore2.ConnectError(f"could not resolve {host}: no addresses")
        return addresses

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore2.SOCKET_OPTION] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        deadline = None if timeout is None else anyio.current_time() + timeout
        addresses = await self._addresses(host, port, deadline)
        for address in addresses:  # vet them all before connecting to any
            self.check(host, address)
        last_error: httpcore2.ConnectError | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(address),
                    port,
                    timeout=_remaining(deadline),
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except httpcore2.ConnectError as exc:
                last_error = exc
        assert last_error is not None
        raise last_error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore2.SOCKET_OPTION] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        raise httpcore2.ConnectError("unix sockets are not allowed for MCP servers")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


# --------------------------------------------------------------------------- response size cap


GuardErrorHook = Callable[[httpx2.TransportError], None]


def _ignore(error: httpx2.TransportError) -> None:
    pass


class _CappedStream(httpx2.AsyncByteStream):
    """A response body that raises ``ResponseTooLarge`` once more than ``limit`` bytes arrive."""

    def __init__(
        self,
        stream: httpx2.AsyncByteStream,
        limit: int,
        request: httpx2.Request,
        report: GuardErrorHook,
    ) -> None:
        self._stream = stream
        self._limit = limit
        self._request = request
        self._report = report

    async def __aiter__(self) -> AsyncIterator[bytes]:
        received = 0
        async for chunk in self._stream:
            received += len(chunk)
            if received > self._limit:
                error = ResponseTooLarge(self._limit, request=self._request)
                self._report(error)
                raise error
            yield chunk

    async def aclose(self) -> None:
        await self._stream.aclose()


async def _capped_response(
    response: httpx2.Response, request: httpx2.Request, limit: int, report: GuardErrorHook
) -> httpx2.Response:
    """``response`` with its body capped at ``limit`` bytes.

    Compressed bodies are refused: the cap counts bytes on the wire, and a few
    kilobytes of gzip can inflate to gigabytes. The request asked for identity
    encoding, so a server that compresses anyway is misbehaving.
    """
    encoding = response.headers.get("content-encoding", "").strip().lower()
    declared = response.headers.get("content-length", "").strip()
    error: httpx2.TransportError | None = None
    if encoding not in ("", "identity"):
        error = httpx2.DecodingError(
            f"refused a {encoding}-encoded response: only uncompressed responses are accepted "
            "when the response size is limited",
            request=request,
        )
    elif declared.isdigit() and int(declared) > limit:
        error = ResponseTooLarge(limit, request=request)
    if error is not None:
        await response.aclose()
        report(error)
        raise error
    assert isinstance(response.stream, httpx2.AsyncByteStream)
    response.stream = _CappedStream(response.stream, limit, request, report)
    return response


class _GuardedTransport(httpx2.AsyncBaseTransport):
    """Wraps the pooled transport: re-raises policy refusals as such, and caps response bodies.

    httpx2 turns every httpcore2.ConnectError into a fresh ``httpx2.ConnectError``
    (with the original as ``__cause__``); we re-raise our ``AddressRefused``
    so callers can catch it by type.
    """

    def __init__(
        self,
        inner: httpx2.AsyncBaseTransport,
        max_response_bytes: int | None,
        on_guard_error: GuardErrorHook | None,
        on_connect_error: Callable[[httpx2.Request], None] | None = None,
    ) -> None:
        self._inner = inner
        self._max_response_bytes = max_response_bytes
        self._report = on_guard_error or _ignore
        self._on_connect_error = on_connect_error

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        if self._max_response_bytes is not None:
            request.headers["Accept-Encoding"] = "identity"
        try:
            response = await self._inner.handle_async_request(request)
        except (httpx2.ConnectError, httpx2.ConnectTimeout) as exc:
            if self._on_connect_error is not None:
                self._on_connect_error(request)
            if isinstance(exc.__cause__, AddressRefused):
                self._report(exc.__cause__)
                raise exc.__cause__ from None
            raise
        if self._max_response_bytes is None:
            return response
        return await _capped_response(response, request, self._max_response_bytes, self._report)

    async def aclose(self) -> None:
        await self._inner.aclose()


@functools.cache
def _default_ssl_context() -> ssl.SSLContext:
    """One verifying context for the process: loading the CA bundle costs ~20 ms, and an
    SSLContext is safe to share between connections and threads."""
    return httpx2.create_ssl_context()


def _pooled_transport(
    backend: GuardedNetworkBackend, ssl_context: ssl.SSLContext | None
) -> httpx2.AsyncHTTPTransport:
    """An ``httpx2.AsyncHTTPTransport`` whose connection pool uses ``backend``.

    httpx2's transport has no network_backend argument, so we build the
    httpcore2 pool ourselves (public API, httpx2's default limits) and install it.
    """
    context = ssl_context if ssl_context is not None else _default_ssl_context()
    transport = httpx2.AsyncHTTPTransport(verify=context)
    if not isinstance(getattr(transport, "_pool", None), httpcore2.AsyncConnectionPool):
        raise RuntimeError("httpx2 internals changed: cannot install the network guard")
    transport._pool = httpcore2.AsyncConnectionPool(
        ssl_context=context,
        max_connections=100,
        max_keepalive_connections=20,
        keepalive_expiry=5.0,
        network_backend=backend,
    )
    return transport


def guarded_client(
    *,
    allow_private_network: bool,
    extra_blocked: Iterable[str | IPNetwork] = (),
    extra_allowed: Iterable[str | IPNetwork] = (),
    headers: httpx2.Headers | dict[str, str] | None = None,
    timeout: httpx2.Timeout | float | None = None,
    max_response_bytes: int | None = None,
    auth: httpx2.Auth | None = None,
    ssl_context: ssl.SSLContext | None = None,
    on_guard_error: GuardErrorHook | None = None,
    on_connect_error: Callable[[httpx2.Request], None] | None = None,
) -> httpx2.AsyncClient:
    """An ``httpx2.AsyncClient`` that can only reach addresses the policy allows.

    * Every connection goes through ``GuardedNetworkBackend`` (see there).
    * ``trust_env=False``: HTTP(S)_PROXY and friends can't route around the guard.
    * ``follow_redirects=False``: the MCP SDK follows same-origin redirects
      itself, and each hop is guarded like any request.
    * ``max_response_bytes``: no single response body may be longer; reading
      more raises ``ResponseTooLarge``. It also applies to event streams, where
      it bounds the whole stream, not one event. Requests then ask for identity
      encoding and compressed responses are refused with ``httpx2.DecodingError``.
    * ``timeout`` defaults to the MCP SDK's (30 s, 300 s to read), never to "none".
    * ``ssl_context`` is for servers with a private CA; verification stays on by default.
    * ``on_guard_error`` is called with each ``AddressRefused``, ``ResponseTooLarge``
      or refused compressed response just before it is raised. The MCP SDK's SSE
      reader catches every exception and reports a closed connection instead, so
      this is how a caller learns the real reason.
    * ``on_connect_error`` is called with each request that could not even connect (refused,
      unreachable, connect timeout): it was never sent. The SDK folds those into a closed
      connection too.
    """
    if max_response_bytes is not None and max_response_bytes <= 0:
        raise ValueError("max_response_bytes must be a positive number of bytes")
    backend = GuardedNetworkBackend(
        allow_private_network=allow_private_network,
        extra_blocked=extra_blocked,
        extra_allowed=extra_allowed,
    )
    transport = _GuardedTransport(
        _pooled_transport(backend, ssl_context),
        max_response_bytes,
        on_guard_error,
        on_connect_error,
    )
    return httpx2.AsyncClient(
        transport=transport,
        headers=headers,
        timeout=DEFAULT_TIMEOUT if timeout is None else timeout,
        auth=auth,
        trust_env=False,
        follow_redirects=False,
    )


def guarded_client_factory(
    *,
    allow_private_network: bool,
    extra_blocked: Iterable[str | IPNetwork] = (),
    extra_allowed: Iterable[str | IPNetwork] = (),
    headers: httpx2.Headers | dict[str, str] | None = None,
    timeout: httpx2.Timeout | float | None = None,
    max_response_bytes: int | None = None,
    ssl_context: ssl.SSLContext | None = None,
    on_guard_error: GuardErrorHook | None = None,
) -> Callable[..., httpx2.AsyncClient]:
    """A factory with the MCP SDK's ``McpHttpClientFactory`` signature, for ``sse_client``.

    Headers given to the factory call are merged over ``headers`` here; a
    timeout given to the call (``sse_client`` always passes one, built from its
    ``timeout`` and ``sse_read_timeout``) wins over ``timeout`` here.
    """
    blocked = parse_networks(extra_blocked)  # parse now, so a bad range fails at setup
    allowed = parse_networks(extra_allowed)
    base_headers = httpx2.Headers(headers)
    base_timeout = timeout

    def factory(
        headers: dict[str, str] | None = None,
        timeout: httpx2.Timeout | None = None,
        auth: httpx2.Auth | None = None,
    ) -> httpx2.AsyncClient:
        merged = httpx2.Headers(base_headers)
        merged.update(headers or {})
        return guarded_client(
            allow_private_network=allow_private_network,
            extra_blocked=blocked,
            extra_allowed=allowed,
            headers=merged,
            timeout=timeout if timeout is not None else base_timeout,
            max_response_bytes=max_response_bytes,
            auth=auth,
            ssl_context=ssl_context,
            on_guard_error=on_guard_error,
        )

    return factory
