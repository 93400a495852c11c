"""Tests for integrations.netguard, the guarded path for outbound connections to MCP servers.

Plain pytest, no Django. Public addresses are only ever classified: every real
connection in this file goes to a server on 127.0.0.1, and the autouse
``loopback_only`` fixture fails any test that tries to connect anywhere else.
"""

from __future__ import annotations

import contextlib
import datetime
import gzip
import ipaddress
import socket
import ssl
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anyio
import httpx2
import hypothesis
import pytest
from hypothesis import strategies as st

from integrations import netguard
from integrations.netguard import (
    AddressRefused,
    ResponseTooLarge,
    UrlRefused,
    find_refusal,
    guarded_client,
    guarded_client_factory,
    is_refused,
    parse_ip_literal,
    validate_url,
)


@pytest.fixture(autouse=True)
def _fast_mcp_timeouts():
    """Shadow conftest's autouse fixture of this name, which needs pytest-django's ``settings``:
    these tests use no Django at all, and run with ``-p no:django`` too."""


# --------------------------------------------------------------------------- address policy

REFUSED = [
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("10.0.0.1", "private network (RFC 1918)"),
    ("172.16.0.1", "private network (RFC 1918)"),
    ("172.31.255.255", "private network (RFC 1918)"),
    ("192.168.1.1", "private network (RFC 1918)"),
    ("169.254.169.254", "link-local / cloud metadata"),
    ("169.254.0.1", "link-local / cloud metadata"),
    ("100.64.0.1", "carrier-grade NAT"),
    ("100.127.255.255", "carrier-grade NAT"),
    ("0.0.0.0", "this network (0.0.0.0/8)"),  # noqa: S104 - classified, never bound
    ("0.1.2.3", "this network (0.0.0.0/8)"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("255.255.255.255", "broadcast"),
    ("240.0.0.1", "reserved"),
    ("192.0.2.1", "reserved"),  # documentation
    ("198.18.0.1", "reserved"),  # benchmarking
    ("::1", "loopback"),
    ("::", "unspecified address (::)"),
    ("fc00::1", "IPv6 unique local"),
    ("fd12:3456:789a::1", "IPv6 unique local"),
    ("fe80::1", "IPv6 link-local"),
    ("fe80::1%eth0", "IPv6 link-local"),
    ("fec0::1", "IPv6 site-local (deprecated)"),
    ("ff02::1", "multicast"),
    ("2001:db8::1", "reserved"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo tunnel"),
    ("::ffff:127.0.0.1", "loopback, via IPv4-mapped 127.0.0.1"),
    ("::ffff:169.254.169.254", "link-local / cloud metadata, via IPv4-mapped 169.254.169.254"),
    ("::ffff:10.1.2.3", "private network (RFC 1918), via IPv4-mapped 10.1.2.3"),
    ("::127.0.0.1", "loopback, via IPv4-compatible 127.0.0.1"),
    ("::10.0.0.1", "private network (RFC 1918), via IPv4-compatible 10.0.0.1"),
    ("64:ff9b::127.0.0.1", "loopback, via NAT64 127.0.0.1"),
    ("64:ff9b::a9fe:a9fe", "link-local / cloud metadata, via NAT64 169.254.169.254"),
    ("64:ff9b:1::192.168.0.1", "private network (RFC 1918), via local-use NAT64 192.168.0.1"),
    ("64:ff9b:1:808:8:800::", "local-use NAT64 (64:ff9b:1::/48)"),  # layout we can't read
    ("2002:7f00:1::1", "loopback, via 6to4 127.0.0.1"),
    ("2002:c0a8:101::1", "private network (RFC 1918), via 6to4 192.168.1.1"),
    ("5f00::1", "reserved"),  # outside IPv6 global unicast
]

PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "9.9.9.9",
    "100.63.255.255",  # just below carrier-grade NAT
    "100.128.0.0",  # just above it
    "172.15.255.255",
    "172.32.0.0",
    "2606:4700:4700::1111",
    "2001:4860:4860::8888",
    "::ffff:8.8.8.8",
    "64:ff9b::8.8.8.8",
    "64:ff9b:1::8.8.8.8",
    "2002:808:808::1",  # 6to4 embedding a public address
]


@pytest.mark.parametrize(("address", "reason"), REFUSED)
def test_refused_addresses(address, reason):
    assert is_refused(address) == reason
    assert is_refused(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address):
    assert is_refused(address) is None


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("2130706433", "loopback"),
        ("0x7f000001", "loopback"),
        ("0177.0.0.1", "loopback"),
        ("127.1", "loopback"),
        ("0x7f.1", "loopback"),
        ("0x7F.0.0.0x1", "loopback"),
        ("0xa9.0xfe.0xa9.0xfe", "link-local / cloud metadata"),
        ("2852039166", "link-local / cloud metadata"),  # 169.254.169.254
        ("012.1", "private network (RFC 1918)"),  # octal 012 = 10
        ("0", "this network (0.0.0.0/8)"),
        ("[::1]", "loopback"),
        ("[::ffff:127.0.0.1]", "loopback, via IPv4-mapped 127.0.0.1"),
        ("[fe80::1%25eth0]", "IPv6 link-local"),
    ],
)
def test_numeric_tricks_are_judged_as_the_address_they_spell(host, reason):
    assert is_refused(host) == reason


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("1.2.3", "1.2.0.3"),
        ("1.0xffffff", "1.255.255.255"),
        ("4294967295", "255.255.255.255"),
        ("[::1]", "::1"),
        ("::1", "::1"),
        ("fe80::1%eth0", "fe80::1%eth0"),
        ("fe80::1%25eth0", "fe80::1%eth0"),  # zone id as written inside a URL
        ("[fe80::1%25eth0]", "fe80::1%eth0"),
    ],
)
def test_parse_ip_literal(host, expected):
    assert parse_ip_literal(host) == ipaddress.ip_address(expected)


@pytest.mark.parametrize(
    "host",
    [
        "example.com",
        "localhost",
        "mcp.test",
        "08",  # 8 is not an octal digit
        "0x",
        "4294967296",  # too big
        "1.256.1",  # a leading part is one byte
        "1.2.3.4.",
        "1..2",
        "127.0.0.1 ",
        " 127.0.0.1",
        "[127.0.0.1]",  # brackets are for IPv6
        "[::1",
        "",
        "1e3",
    ],
)
def test_parse_ip_literal_leaves_names_alone(host):
    assert parse_ip_literal(host) is None


@pytest.mark.skipif(sys.platform != "linux", reason="compares with glibc's inet_aton")
@pytest.mark.parametrize(
    "text",
    [
        *("2130706433", "0x7f.1", "0177.1", "1.2.3", "1.2.65535", "1.2.65536", "08", "0x"),
        *("0x.1", "017777777777", "037777777777", "040000000000", "0x00000000007f.1", "1.2.3.4.5"),
    ],
)
def test_parse_ip_literal_agrees_with_libc(text):
    import socket

    try:
        expected = ipaddress.IPv4Address(socket.inet_aton(text))
    except OSError:
        expected = None
    assert parse_ip_literal(text) == expected


@pytest.mark.skipif(sys.platform != "linux", reason="compares with glibc's inet_aton")
@hypothesis.settings(max_examples=500, deadline=None)
@hypothesis.given(st.text(alphabet="0123456789abcdefxX.", max_size=24))
def test_parse_ip_literal_agrees_with_libc_on_any_numeric_text(text):
    import socket

    try:
        expected = ipaddress.IPv4Address(socket.inet_aton(text))
    except OSError:
        expected = None
    assert parse_ip_literal(text) == expected


def test_extra_allowed_overrides_the_builtin_list():
    assert is_refused("10.1.2.3", extra_allowed=["10.0.0.0/8"]) is None
    assert is_refused("::ffff:10.1.2.3", extra_allowed=["10.0.0.0/8"]) is None
    assert is_refused("10.1.2.3", extra_allowed=["192.168.0.0/16"]) == (
        "private network (RFC 1918)"
    )


def test_extra_blocked_wins_over_everything():
    assert is_refused("8.8.8.8", extra_blocked=["8.8.8.0/24"]) == "in blocked range 8.8.8.0/24"
    assert is_refused("10.1.2.3", extra_blocked=["10.1.0.0/16"], extra_allowed=["10.0.0.0/8"]) == (
        "in blocked range 10.1.0.0/16"
    )
    # the IPv4 address inside an IPv6 form is matched too
    assert is_refused("::ffff:8.8.8.8", extra_blocked=["8.8.8.8"]) == "in blocked range 8.8.8.8/32"
    assert is_refused("2606:4700::1", extra_blocked=["2606:4700::/32"]) is not None


def test_bad_extra_ranges_are_errors():
    with pytest.raises(ValueError, match="host bits set"):
        is_refused("8.8.8.8", extra_blocked=["10.0.0.1/8"])
    with pytest.raises(ValueError):
        is_refused("8.8.8.8", extra_allowed=["not-a-network"])
    with pytest.raises(TypeError):
        is_refused("8.8.8.8", extra_blocked="10.0.0.0/8")


def test_is_refused_rejects_names():
    with pytest.raises(ValueError, match="not an IP address"):
        is_refused("localhost")


# --------------------------------------------------------------------------- validate_url


@pytest.mark.parametrize(
    "url",
    [
        "https://mcp.example.com/",
        "https://mcp.example.com:8443/mcp?x=1",
        "https://[2606:4700:4700::1111]/sse",
        "https://bücher.example/mcp",
        "HTTPS://MCP.EXAMPLE.COM/",
    ],
)
def test_validate_url_accepts(url):
    validate_url(url, allow_http=False)


def test_validate_url_http_only_when_allowed():
    validate_url("http://mcp.example.com/", allow_http=True)
    with pytest.raises(UrlRefused, match="https://"):
        validate_url("http://mcp.example.com/", allow_http=False)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "Enter a URL"),
        ("ftp://mcp.example.com/", "must start with https://"),
        ("mcp.example.com/path", "must start with https://"),
        ("javascript:alert(1)", "must start with https://"),
        ("https://", "must include a host"),
        ("https:///path", "must include a host"),
        ("https://:443/", "must include a host"),
        ("https://exa mple.com/", "spaces or control characters"),
        ("https://example.com/\n", "spaces or control characters"),
        ("https://example.com/\x00", "spaces or control characters"),
        ("https://example.com/\x7f", "spaces or control characters"),
        (" https://example.com/", "spaces or control characters"),
        ("https://example.com\\@evil.test/", "backslashes"),
        ("https://user:pw@example.com/", "user name or password"),
        ("https://good.example@evil.test/", "user name or password"),
        ("https://example.com:99999/", "not a valid URL"),
        ("https://example.com:http/", "not a valid URL"),
        ("https://example.com:0/", "port"),
        ("https://[::1/", "not a valid URL"),
    ],
)
def test_validate_url_refuses(url, message):
    with pytest.raises(UrlRefused, match=message):
        validate_url(url, allow_http=False)


def test_validate_url_does_not_resolve(monkeypatch):
    async def no_dns(host, port):  # pragma: no cover - must not be called
        raise AssertionError("validate_url resolved DNS")

    monkeypatch.setattr(netguard, "resolve_host", no_dns)
    monkeypatch.setattr(anyio, "getaddrinfo", no_dns)
    validate_url("https://does-not-exist.invalid/", allow_http=False)


# --------------------------------------------------------------------------- loopback servers


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch) -> list[str]:
    """Fail the test if anything tries to open a TCP connection to a non-loopback address.

    Also records where connections went, so tests can see that the guard dialled
    the vetted IP address and not the hostname.
    """
    real_connect_tcp = anyio.connect_tcp
    dialled: list[str] = []

    async def connect_tcp(remote_host, remote_port, **kwargs):
        dialled.append(str(remote_host))
        if not ipaddress.ip_address(str(remote_host)).is_loopback:
            raise AssertionError(f"test tried to connect to {remote_host}")
        return await real_connect_tcp(remote_host, remote_port, **kwargs)

    monkeypatch.setattr(anyio, "connect_tcp", connect_tcp)
    return dialled


@pytest.fixture
def fake_dns(monkeypatch) -> dict[str, list[list[str]]]:
    """Replace the resolver. Map a name to a list of answers; each lookup takes the next one
    (the last answer repeats)."""
    answers: dict[str, list[list[str]]] = {}

    async def resolve(host: str, port: int):
        queue = answers[host]
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        return [ipaddress.ip_address(a) for a in answer]

    monkeypatch.setattr(netguard, "resolve_host", resolve)
    return answers


BIG = 100_000


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def _send(self, status, body=b"", headers=()):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.server.requests.append({"path": self.path, **dict(self.headers.items())})
        try:
            if self.path == "/big":
                self._send(200, b"x" * BIG)
            elif self.path == "/big-stream":
                self._send_stream()
            elif self.path == "/gzip":
                self._send(200, gzip.compress(b"x" * 1000), [("Content-Encoding", "gzip")])
            elif self.path == "/redirect":
                self._send(302, headers=[("Location", "/")])
            else:
                self._send(200, b"ok")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send_stream(self):
        """An event stream with no Content-Length: only counting bytes can cap it."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        event = b"data: " + b"x" * 994 + b"\n\n"
        for _ in range(BIG // len(event)):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")


class _RecordingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, *args, **kwargs):
        self.connections: list[tuple[str, int]] = []
        self.requests: list[dict[str, str]] = []
        super().__init__(*args, **kwargs)

    def verify_request(self, request, client_address):
        self.connections.append(client_address)  # every accepted TCP connection
        return True


@contextlib.contextmanager
def _serving(server: _RecordingServer) -> Iterator[_RecordingServer]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def server() -> Iterator[_RecordingServer]:
    with _serving(_RecordingServer(("127.0.0.1", 0), _Handler)) as running:
        yield running


def _port(server: _RecordingServer) -> int:
    return server.server_address[1]


def _get(client: httpx2.AsyncClient, url: str) -> httpx2.Response:
    async def main():
        async with client:
            return await client.get(url)

    return anyio.run(main)


# --------------------------------------------------------------------------- connect-time guard


def test_loopback_is_refused_before_anything_reaches_the_server(server, loopback_only):
    url = f"http://127.0.0.1:{_port(server)}/"
    with pytest.raises(AddressRefused) as caught:
        _get(guarded_client(allow_private_network=False), url)

    assert str(caught.value) == (
        "refused to connect to 127.0.0.1 (loopback) for host 127.0.0.1: "
        "private network addresses are not allowed for this server"
    )
    assert isinstance(caught.value, httpx2.ConnectError)  # old handlers still catch it
    assert caught.value.request.url == url
    assert loopback_only == []  # nothing was even dialled
    assert server.connections == []


def test_localhost_is_refused(server, loopback_only):
    with pytest.raises(AddressRefused, match=r"\(loopback\) for host localhost: private"):
        _get(guarded_client(allow_private_network=False), f"http://localhost:{_port(server)}/")
    assert loopback_only == []
    assert server.connections == []


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "127.1", "[::ffff:127.0.0.1]"])
def test_numeric_hosts_are_refused(server, host):
    with pytest.raises(AddressRefused, match="loopback"):
        _get(guarded_client(allow_private_network=False), f"http://{host}:{_port(server)}/")
    assert server.connections == []


def test_private_network_allowed_for_this_server(server, loopback_only):
    client = guarded_client(allow_private_network=True)
    response = _get(client, f"http://127.0.0.1:{_port(server)}/")
    assert response.status_code == 200
    assert response.text == "ok"
    assert len(server.requests) == 1


def test_numeric_host_connects_to_the_address_it_spells(server, loopback_only):
    response = _get(guarded_client(allow_private_network=True), f"http://0x7f.1:{_port(server)}/")
    assert response.status_code == 200
    assert loopback_only == ["127.0.0.1"]


def test_extra_allowed_admits_one_range(server):
    client = guarded_client(allow_private_network=False, extra_allowed=["127.0.0.1/32"])
    assert _get(client, f"http://127.0.0.1:{_port(server)}/").status_code == 200


def test_extra_blocked_applies_even_when_private_networks_are_allowed(server):
    client = guarded_client(allow_private_network=True, extra_blocked=["127.0.0.0/8"])
    with pytest.raises(AddressRefused) as caught:
        _get(client, f"http://127.0.0.1:{_port(server)}/")
    assert str(caught.value) == (
        "refused to connect to 127.0.0.1 (in blocked range 127.0.0.0/8) for host 127.0.0.1: "
        "this address range is blocked for every server"
    )
    assert server.connections == []


def test_dns_rebinding_is_refused_at_connect_time(server, fake_dns):
    """A name that was public when checked earlier and is loopback when we connect."""
    fake_dns["rebind.test"] = [["8.8.8.8"], ["127.0.0.1"]]

    async def earlier_check():
        return await netguard.resolve_host("rebind.test", 443)

    first_answer = anyio.run(earlier_check)
    assert [is_refused(a) for a in first_answer] == [None]

    with pytest.raises(AddressRefused) as caught:
        _get(guarded_client(allow_private_network=False), f"http://rebind.test:{_port(server)}/")
    assert str(caught.value).startswith(
        "refused to connect to 127.0.0.1 (loopback) for host rebind.test:"
    )
    assert server.connections == []


def test_one_refused_answer_among_public_ones_refuses_the_host(server, fake_dns, loopback_only):
    fake_dns["mixed.test"] = [["8.8.8.8", "127.0.0.1"]]
    with pytest.raises(AddressRefused, match=r"127\.0\.0\.1 \(loopback\) for host mixed\.test"):
        _get(guarded_client(allow_private_network=False), f"http://mixed.test:{_port(server)}/")
    assert loopback_only == []  # nothing was dialled, not even the public address
    assert server.connections == []


def test_connection_goes_to_the_vetted_address(server, fake_dns, loopback_only):
    fake_dns["mcp.test"] = [["127.0.0.1"]]
    port = _port(server)
    response = _get(guarded_client(allow_private_network=True), f"http://mcp.test:{port}/")
    assert response.status_code == 200
    assert loopback_only == ["127.0.0.1"]  # the IP was dialled, not the name
    assert server.requests[0]["Host"] == f"mcp.test:{port}"


class _RecordingServerV6(_RecordingServer):
    address_family = socket.AF_INET6


@pytest.fixture
def server_v6() -> Iterator[_RecordingServer]:
    with _serving(_RecordingServerV6(("::1", 0), _Handler)) as running:
        yield running


@pytest.fixture
def getaddrinfo_answers(monkeypatch) -> dict[str, list[str]]:
    """Answers for names, in the shape anyio.getaddrinfo really returns: IPv6 socket addresses
    as 2-tuples (host, port), a scope id appended to the host. The real resolver of this
    machine has no IPv6 names, so this stands in for the DNS beneath `resolve_host`."""
    answers: dict[str, list[str]] = {}
    real = anyio.getaddrinfo

    async def getaddrinfo(host, port, **kwargs):
        if host not in answers:
            return await real(host, port, **kwargs)
        infos = []
        for address in answers[host]:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            infos.append((family, socket.SOCK_STREAM, 6, "", (address, port)))
        return infos

    monkeypatch.setattr(anyio, "getaddrinfo", getaddrinfo)
    return answers


def test_an_ipv6_only_name_resolves_and_connects_when_allowed(server_v6, getaddrinfo_answers):
    getaddrinfo_answers["v6only.test"] = ["::1"]
    assert anyio.run(netguard.resolve_host, "v6only.test", 80) == [ipaddress.ip_address("::1")]
    port = _port(server_v6)
    response = _get(guarded_client(allow_private_network=True), f"http://v6only.test:{port}/")
    assert response.status_code == 200
    assert server_v6.requests[0]["Host"] == f"v6only.test:{port}"


def test_an_ipv6_only_name_stays_guarded(server_v6, getaddrinfo_answers, loopback_only):
    getaddrinfo_answers["v6only.test"] = ["::1"]
    with pytest.raises(AddressRefused, match=r"::1 \(loopback\) for host v6only\.test"):
        _get(guarded_client(allow_private_network=False), f"http://v6only.test:{_port(server_v6)}/")
    assert loopback_only == []
    assert server_v6.connections == []


def test_a_dual_stack_name_is_refused_if_either_answer_is(server_v6, getaddrinfo_answers):
    getaddrinfo_answers["dual.test"] = ["2606:4700::1111", "127.0.0.1"]
    with pytest.raises(AddressRefused, match=r"127\.0\.0\.1 \(loopback\)"):
        _get(guarded_client(allow_private_network=False), f"http://dual.test:{_port(server_v6)}/")
    getaddrinfo_answers["dual.test"] = ["::ffff:127.0.0.1", "1.1.1.1"]
    with pytest.raises(AddressRefused, match=r"loopback, via IPv4-mapped 127\.0\.0\.1"):
        _get(guarded_client(allow_private_network=False), f"http://dual.test:{_port(server_v6)}/")
    assert server_v6.connections == []


def test_a_dual_stack_name_connects_to_its_first_answer(server_v6, getaddrinfo_answers):
    getaddrinfo_answers["dual.test"] = ["::1", "127.0.0.1"]
    response = _get(
        guarded_client(allow_private_network=True), f"http://dual.test:{_port(server_v6)}/"
    )
    assert response.status_code == 200
    assert server_v6.connections and server_v6.connections[0][0] == "::1"


def test_a_scope_id_is_kept_as_the_zone(getaddrinfo_answers):
    getaddrinfo_answers["linklocal.test"] = ["fe80::1%2"]
    [address] = anyio.run(netguard.resolve_host, "linklocal.test", 80)
    assert address == ipaddress.IPv6Address("fe80::1%2")
    assert is_refused(address) == "IPv6 link-local"


def test_an_ipv6_literal_url_reaches_the_server(server_v6):
    url = f"http://[::1]:{_port(server_v6)}/"
    assert _get(guarded_client(allow_private_network=True), url).status_code == 200
    with pytest.raises(AddressRefused, match="loopback"):
        _get(guarded_client(allow_private_network=False), url)


def test_unresolvable_host_is_an_ordinary_connect_error(monkeypatch):
    async def fail(host, port):
        raise OSError("Name or service not known")

    monkeypatch.setattr(netguard, "resolve_host", fail)
    with pytest.raises(httpx2.ConnectError, match=r"could not resolve nowhere\.test") as caught:
        _get(guarded_client(allow_private_network=False), "http://nowhere.test/")
    assert not isinstance(caught.value, AddressRefused)
    assert find_refusal(caught.value) is None


def test_proxy_environment_variables_are_ignored(server, monkeypatch):
    # Were the proxy used, the request would fail: nothing listens on port 9.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    response = _get(
        guarded_client(allow_private_network=True), f"http://127.0.0.1:{_port(server)}/"
    )
    assert response.status_code == 200
    assert server.requests[0]["path"] == "/"


def test_redirects_are_not_followed(server):
    port = _port(server)
    response = _get(guarded_client(allow_private_network=True), f"http://127.0.0.1:{port}/redirect")
    assert response.status_code == 302
    assert len(server.requests) == 1


def test_find_refusal_looks_through_groups_and_chains():
    refusal = AddressRefused("h", ipaddress.ip_address("127.0.0.1"), "loopback", "why")
    try:
        raise httpx2.ConnectError(str(refusal)) from refusal
    except httpx2.ConnectError as wrapped:
        group = ExceptionGroup("task group", [ValueError("other"), wrapped])
    assert find_refusal(group) is refusal
    assert find_refusal(ExceptionGroup("g", [ValueError("x")])) is None


# --------------------------------------------------------------------------- TLS


def _self_signed(hostname: str) -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.fixture
def tls_server(tmp_path) -> Iterator[tuple[_RecordingServer, bytes, list[str]]]:
    cert_pem, key_pem = _self_signed("mcp.test")
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server_names: list[str] = []
    context.sni_callback = lambda sock, name, ctx: server_names.append(name)
    server = _RecordingServer(("127.0.0.1", 0), _Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    with _serving(server) as running:
        yield running, cert_pem, server_names


def test_tls_verifies_the_url_hostname_while_dialling_the_ip(tls_server, fake_dns):
    server, cert_pem, server_names = tls_server
    fake_dns["mcp.test"] = [["127.0.0.1"]]
    fake_dns["other.test"] = [["127.0.0.1"]]
    trusted = ssl.create_default_context(cadata=cert_pem.decode())

    client = guarded_client(allow_private_network=True, ssl_context=trusted)
    response = _get(client, f"https://mcp.test:{_port(server)}/")
    assert response.status_code == 200
    assert server_names == ["mcp.test"]  # SNI carries the name, not 127.0.0.1

    # Same IP, but the certificate is not for this name: verification must fail.
    client = guarded_client(allow_private_network=True, ssl_context=trusted)
    with pytest.raises(httpx2.ConnectError, match="certificate verify failed") as caught:
        _get(client, f"https://other.test:{_port(server)}/")
    assert not isinstance(caught.value, AddressRefused)
    assert len(server.requests) == 1


# --------------------------------------------------------------------------- response size cap


def test_small_response_passes_the_cap(server):
    client = guarded_client(allow_private_network=True, max_response_bytes=1000)
    response = _get(client, f"http://127.0.0.1:{_port(server)}/")
    assert response.text == "ok"
    assert server.requests[0]["Accept-Encoding"] == "identity"


@pytest.mark.parametrize("path", ["/big", "/big-stream"])
def test_big_response_is_refused(server, path):
    client = guarded_client(allow_private_network=True, max_response_bytes=1000)
    with pytest.raises(ResponseTooLarge, match="limit of 1000 bytes") as caught:
        _get(client, f"http://127.0.0.1:{_port(server)}{path}")
    assert isinstance(caught.value, httpx2.TransportError)


def test_cap_holds_for_streamed_responses(server):
    received = []

    async def main():
        client = guarded_client(allow_private_network=True, max_response_bytes=10_000)
        async with (
            client,
            client.stream("GET", f"http://127.0.0.1:{_port(server)}/big-stream") as response,
        ):
            async for chunk in response.aiter_bytes():
                received.append(chunk)

    with pytest.raises(ResponseTooLarge):
        anyio.run(main)
    assert 0 < sum(map(len, received)) <= 10_000


def test_streamed_response_under_the_cap_is_read_whole(server):
    client = guarded_client(allow_private_network=True, max_response_bytes=2 * BIG)
    response = _get(client, f"http://127.0.0.1:{_port(server)}/big-stream")
    assert response.headers["content-type"] == "text/event-stream"
    assert len(response.content) >= BIG - 1000


def test_compressed_response_is_refused_when_capped(server):
    client = guarded_client(allow_private_network=True, max_response_bytes=BIG)
    with pytest.raises(httpx2.DecodingError, match="gzip-encoded"):
        _get(client, f"http://127.0.0.1:{_port(server)}/gzip")


def test_guard_errors_are_reported_to_the_hook(server):
    """The MCP SDK's SSE reader swallows exceptions; the hook still hears about them."""
    seen: list[httpx2.TransportError] = []
    port = _port(server)
    capped = guarded_client(
        allow_private_network=True, max_response_bytes=1000, on_guard_error=seen.append
    )
    with pytest.raises(ResponseTooLarge):
        _get(capped, f"http://127.0.0.1:{port}/big-stream")
    refusing = guarded_client(allow_private_network=False, on_guard_error=seen.append)
    with pytest.raises(AddressRefused):
        _get(refusing, f"http://127.0.0.1:{port}/")
    assert [type(error) for error in seen] == [ResponseTooLarge, AddressRefused]


def test_cap_must_be_positive():
    with pytest.raises(ValueError):
        guarded_client(allow_private_network=False, max_response_bytes=0)


# --------------------------------------------------------------------------- client settings


def test_client_settings():
    client = guarded_client(allow_private_network=False, headers={"X-A": "1"})
    assert client.trust_env is False
    assert client.follow_redirects is False
    assert client.headers["X-A"] == "1"
    assert client.timeout == httpx2.Timeout(30.0, read=300.0)  # never "no timeout"


def test_factory_has_the_mcp_signature_and_merges_settings(server):
    factory = guarded_client_factory(
        allow_private_network=True,
        headers={"X-Toolgate": "1", "X-Override": "factory"},
        timeout=httpx2.Timeout(10.0),
        max_response_bytes=1000,
    )
    client = factory(headers={"X-Override": "call"}, timeout=httpx2.Timeout(5.0, read=60.0))
    assert client.timeout == httpx2.Timeout(5.0, read=60.0)
    assert client.trust_env is False
    assert client.follow_redirects is False
    response = _get(client, f"http://127.0.0.1:{_port(server)}/")
    assert response.status_code == 200
    assert server.requests[0]["X-Toolgate"] == "1"
    assert server.requests[0]["X-Override"] == "call"

    assert factory().timeout == httpx2.Timeout(10.0)
    with pytest.raises(ResponseTooLarge):
        _get(factory(), f"http://127.0.0.1:{_port(server)}/big")


def test_factory_clients_are_guarded_too(server):
    factory = guarded_client_factory(allow_private_network=False)
    with pytest.raises(AddressRefused):
        _get(factory(headers=None, timeout=None, auth=None), f"http://127.0.0.1:{_port(server)}/")
    assert server.connections == []


def test_factory_checks_ranges_up_front():
    with pytest.raises(ValueError):
        guarded_client_factory(allow_private_network=False, extra_blocked=["10.0.0.1/8"])
