"""Property-based tests of the MCP server form and the admin's add and change pages (issue 5).

Whatever an admin types, the form and the admin answer with a page (200) or a redirect (302),
never a 5xx. An invalid form lists its errors and creates or changes no server; a valid one
creates exactly one, holding the values as the form normalises them (stripped, headers
parsed), and one the client can actually use. No re-rendered page shows back a secret (the
URL's path, query or credentials, the token, or a header value), except the URL typed into the
refused POST, in the URL field itself, so the admin need not type it again.

The inputs are drawn with a label saying whether the form must accept them (None where the
rules don't decide, such as an internationalised host name), so the properties check the
form's verdict as well as its conduct.

Reproducibility: examples are derandomized (`derandomize=True`, no example database), so CI
runs the same inputs everywhere and a failure reproduces from the test name alone; inputs that
once failed are pinned with `@example`. Set TOOLGATE_HYPOTHESIS_EXPLORE=1 to draw fresh random
examples, and more of them, locally.

No network: `McpServer.request_sync` is replaced by a mock, DNS by a resolver that knows only
`localhost` (as /etc/hosts does), and every example runs in a savepoint that is rolled back.
"""

import string
from contextlib import contextmanager
from dataclasses import dataclass, field
from unittest import mock

import httpx2
import pytest
from django.db import transaction
from django.test import Client
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from integrations import netguard
from integrations.forms import RESERVED_HEADERS, McpServerForm
from integrations.models import ApprovalMode, McpServer, Transport
from tests.conftest import HYPOTHESIS_PROPERTIES as PROPERTIES
from tests.test_server_admin import without_typed_url

pytestmark = pytest.mark.django_db


ADD_URL = "/admin/integrations/mcpserver/add/"
INLINE_MANAGEMENT = {
    "tools-TOTAL_FORMS": "0",
    "tools-INITIAL_FORMS": "0",
    "tools-MIN_NUM_FORMS": "0",
    "tools-MAX_NUM_FORMS": "1000",
}
BOOLEANS = ["enabled", "allow_http", "allow_private_network", "clear_secret_token", "clear_headers"]

# The server that is there before each example: its name is taken, its secrets are stored.
STORED_URL = "https://stored.example.com/path/STOREDPATHSECRET?k=STOREDQUERYSECRET"
STORED_TOKEN = "STOREDTOKENSECRET"
STORED_HEADERS = {"X-Stored": "STOREDHEADERSECRET"}
STORED_SECRETS = ["STOREDPATHSECRET", "STOREDQUERYSECRET", STORED_TOKEN, "STOREDHEADERSECRET"]


def weighted(*choices):
    """One of the strategies, drawn with the given weights (`st.one_of` picks about evenly and
    merges repeated branches). Shrinks towards the first."""
    indexes = [index for index, (_, weight) in enumerate(choices) for _ in range(weight)]
    return st.sampled_from(indexes).flatmap(lambda index: choices[index][0])


@dataclass
class Field:
    """One drawn form value: what is posted, whether the form must accept it (None: the rules
    don't say), and the secrets in it that no page may show back."""

    value: str
    ok: bool | None = True
    secrets: list = field(default_factory=list)
    needs_http: bool = False  # acceptable only with "allow plain HTTP"
    needs_private: bool = False  # acceptable only with "allow private network"


def _all(*oks):
    if False in oks:
        return False
    return None if None in oks else True


markers = st.text(string.ascii_letters + string.digits, min_size=6, max_size=10).map(
    lambda tail: "SECRET" + tail  # long and alphanumeric: never in a page by chance or escaped
)
ascii_visible = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12)
# Characters Python's URL parser refuses in a host under NFKC normalization, and others that
# look like ASCII punctuation or change the text direction.
TRICKY = [
    "\uff03", "\uff0f", "\uff20", "\uff1a", "\uff1f",  # fullwidth # / @ : ?
    "\u2100", "\u2105", "\uff0e", "\u3002", "\uff45",  # a/c, c/o, fullwidth . and e, 。
    "ß", "İ", "\u200d", "\u202e", "\u0301", "①", "ﬁ",
]  # fmt: skip
CONTROL = [chr(c) for c in [*range(0x20), 0x7F, 0x85]]
SPACES = [" ", "\t", "\u00a0", "\u2028", "\u3000"]

# ------------------------------------------------------------------------------ URLs

dns_names = st.from_regex(
    r"[a-z][a-z0-9-]{0,15}(\.[a-z][a-z0-9-]{0,10}){0,2}\.[a-z]{2,6}", fullmatch=True
)
ip_hosts = st.sampled_from(["93.184.216.34", "[2001:db8::1]", "[::1]", "127.0.0.1", "10.0.0.1",
                            "169.254.169.254", "localhost"])  # fmt: skip
# Refused when saving unless "allow private network" is ticked (2001:db8::/32 is reserved).
PRIVATE_HOSTS = {"[2001:db8::1]", "[::1]", "127.0.0.1", "10.0.0.1", "169.254.169.254", "localhost"}
# Numeric forms a resolver reads as an address (2130706433 is 127.0.0.1): still a valid shape.
numeric_hosts = st.sampled_from(["2130706433", "0x7f.0.0.1", "127.1", "017700000001", "0177.0.0.1",
                                 "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "0"])  # fmt: skip
unicode_hosts = st.one_of(
    st.sampled_from(["bücher.example", "例え.テスト", "xn--bcher-kva.example", "ドメイン.jp"]),
    st.builds(
        lambda a, c, b: f"{a}{c}{b}.example",
        st.sampled_from(["evil", "mcp", "a"]),
        st.sampled_from(TRICKY),
        st.sampled_from(["com", "good", "x"]),
    ),
)


@st.composite
def urls(draw):
    kind = draw(
        weighted(
            (st.just("https"), 12),
            (
                st.sampled_from(
                    [
                        "http",
                        "unicode",
                        "numeric",
                        "scheme",
                        "userinfo",
                        "port",
                        "inside",
                        "nfkc_userinfo",
                        "junk",
                        "empty",
                    ]
                ),
                10,
            ),
        )
    )
    event(f"url: {kind}")
    secret = draw(markers)
    path = draw(st.sampled_from(["", "/", "/mcp", "/{s}", "/v1/{s}/mcp", "/mcp?key={s}",
                                 "/{s}?a=1&b={s}#frag"]))  # fmt: skip
    path = path.format(s=secret)
    secrets = [secret] if secret in path else []
    port = draw(st.sampled_from(["", "", ":443", ":8443", ":1", ":65535"]))
    host = draw(weighted((dns_names, 4), (ip_hosts, 1)))
    pad = draw(st.sampled_from(["", "", " ", "\t", "\n", " \r\n "]))  # stripped by the form

    if kind in ("https", "http"):
        scheme = draw(st.sampled_from(["https", "HTTPS", "Https"])) if kind == "https" else "http"
        url = f"{pad}{scheme}://{host}{port}{path}{pad}"
        private = host in PRIVATE_HOSTS
        return Field(url, True, secrets, needs_http=kind == "http", needs_private=private)
    if kind == "unicode":
        return Field(f"https://{draw(unicode_hosts)}{port}{path}", None, secrets)
    if kind == "numeric":
        return Field(f"https://{draw(numeric_hosts)}{port}{path}", None, secrets)
    if kind == "scheme":
        scheme = draw(st.sampled_from(["ftp://", "file://", "ws://", "wss://", "javascript:",
                                       "data:", "gopher://", "//", "https:", "https:/", "mailto:",
                                       "httpss://", ""]))  # fmt: skip
        return Field(f"{scheme}{host}{path}", False, secrets)
    if kind == "userinfo":
        user = draw(st.sampled_from(["{s}@", "user:{s}@", ":{s}@", "{s}:@"])).format(s=secret)
        return Field(f"https://{user}{host}{path}", False, [secret, *secrets])
    if kind == "port":
        bad = draw(st.sampled_from([":0", ":65536", ":99999", ":-1", ":{s}", ":8a", ":{s}'x"]))
        bad = bad.format(s=secret)
        return Field(f"https://{host}{bad}{path}", False, [secret, *secrets])
    if kind == "inside":  # a space, control character or backslash inside the URL
        url = f"https://{host}{port}{path or '/mcp'}"
        cut = draw(st.integers(len("https://") + 1, len(url) - 1))
        bad = draw(st.sampled_from([*CONTROL, *SPACES, "\\"]))
        return Field(url[:cut] + bad + url[cut:], False, secrets)
    if kind == "nfkc_userinfo":  # credentials and a character the URL parser chokes on
        trick = draw(st.sampled_from(TRICKY))
        return Field(f"https://user:{secret}{trick}@{host}{path}", False, [secret, *secrets])
    if kind == "junk":
        return Field(draw(st.text(max_size=40)), None)
    return Field(draw(st.sampled_from(["", " ", "\t\n"])), False)


# ------------------------------------------------------------------------------ token, headers


@st.composite
def tokens(draw):
    kind = draw(
        weighted(
            (st.just("none"), 4),
            (st.just("good"), 5),
            (st.sampled_from(["inner_space", "control", "non_ascii", "junk"]), 3),
        )
    )
    event(f"token: {kind}")
    if kind == "none":
        return Field(draw(st.sampled_from(["", "  "])), True)
    secret = draw(markers)
    if kind == "good":
        pad = draw(st.sampled_from(["", " ", "\t", " \n"]))
        token = f"{draw(ascii_visible)}{secret}{draw(ascii_visible)}"
        return Field(f"{pad}{token}{pad}", True, [secret])
    if kind == "inner_space":
        return Field(f"{secret} {draw(markers)}", False, [secret])
    if kind == "control":
        return Field(f"{secret}{draw(st.sampled_from(CONTROL))}x", False, [secret])
    if kind == "non_ascii":  # an HTTP client sends header values as ASCII only
        extra = draw(st.sampled_from(["é", "\u00a0", "€", "\u2028", "😀", "ÿ", "\u0100"]))
        return Field(f"{secret}{extra}x", False, [secret])
    return Field(draw(st.text(max_size=30)), None)


header_names = st.text(
    string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~", min_size=1, max_size=20
).filter(lambda name: name.lower() not in RESERVED_HEADERS and name.lower() != "authorization")
MUST_REFUSE = ["Host", "Content-Length", "Content-Type", "Transfer-Encoding", "Connection",
               "Upgrade", "TE", "Trailer", "Keep-Alive", "Proxy-Authorization", "Accept",
               "Cookie", "Mcp-Session-Id", "MCP-Protocol-Version", "Last-Event-ID"]  # fmt: skip
value_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)


@dataclass
class Line:
    text: str
    kind: str  # header, authorization, blank, bad, junk
    name: str = ""
    value: str = ""
    secrets: list = field(default_factory=list)


def _random_case(draw, name):
    return "".join(c.upper() if draw(st.booleans()) else c.lower() for c in name)


@st.composite
def header_lines(draw):
    kind = draw(
        weighted(
            (st.just("header"), 10),
            (
                st.sampled_from(
                    [
                        "blank",
                        "authorization",
                        "reserved",
                        "bad_name",
                        "no_colon",
                        "control",
                        "injection",
                        "non_ascii",
                        "junk",
                    ]
                ),
                5,
            ),
        )
    )
    secret = draw(markers)
    value = f"{draw(value_text)}{secret}{draw(value_text)}"
    sep = draw(st.sampled_from([":", ": ", " : ", ":\t"]))
    if kind == "header":
        name = draw(header_names)
        return Line(f"{name}{sep}{value}", "header", name, value.strip(), [secret])
    if kind == "blank":
        return Line(draw(st.sampled_from(["", " ", "\t"])), "blank")
    if kind == "authorization":
        name = _random_case(draw, "Authorization")
        return Line(f"{name}{sep}Bearer {secret}", "authorization", name, f"Bearer {secret}",
                    [secret])  # fmt: skip
    if kind == "reserved":
        name = _random_case(draw, draw(st.sampled_from(MUST_REFUSE)))
        return Line(f"{name}{sep}{value}", "bad", secrets=[secret])
    if kind == "bad_name":
        name = draw(st.sampled_from(["X Api Key", "X-Api-Key(1)", "X@Key", "Ключ", "X-Käse",
                                     "X-A\u00a0B", "[X]", "X,Y", "X\"Y", ""]))  # fmt: skip
        return Line(f"{name}{sep}{value}", "bad", secrets=[secret])
    if kind == "no_colon":
        return Line(f"X-Api-Key {secret}", "bad", secrets=[secret])
    if kind == "control":  # characters that don't also break the line
        bad = draw(
            st.sampled_from([chr(c) for c in [*range(0x09), *range(0x0E, 0x1C), 0x1F, 0x7F]])
        )
        return Line(f"X-Api-Key: {secret}{bad}x", "bad", secrets=[secret])
    if kind == "injection":  # a value smuggling a second header line
        nl = draw(st.sampled_from(["\r\n", "\n", "\r"]))
        smuggled = _random_case(draw, draw(st.sampled_from(MUST_REFUSE)))
        return Line(f"X-Api-Key: {secret}{nl}{smuggled}: evil", "bad", secrets=[secret])
    if kind == "non_ascii":  # an HTTP client sends header values as ASCII only
        extra = draw(st.sampled_from(["é", "€", "😀", "ÿ", "\u00a0x"]))
        return Line(f"X-Api-Key: {secret}{extra}", "bad", secrets=[secret])
    return Line(draw(st.text(max_size=30)), "junk")


@st.composite
def headers_texts(draw):
    """(text, whether the lines alone are acceptable, the expected dict, any Authorization,
    secrets)."""
    lines = draw(st.lists(header_lines(), max_size=4))
    if lines and draw(st.integers(0, 7)) == 0:  # a header given twice, in another case
        first = next((line for line in lines if line.kind == "header"), None)
        if first:
            twin = _random_case(draw, first.name)
            lines.append(Line(f"{twin}: again", "duplicate"))
    text = draw(st.sampled_from(["\n", "\r\n"])).join(line.text for line in lines)
    kinds = {line.kind for line in lines}
    event(f"headers: {'+'.join(sorted(kinds)) or 'none'}")
    ok = None if "junk" in kinds else not ({"bad", "duplicate"} & kinds)
    named = [line for line in lines if line.kind in ("header", "authorization")]
    if len({line.name.lower() for line in named}) < len(named):
        ok = False if ok is not None else None  # the same name twice
    expected = {line.name: line.value for line in named}
    secrets = [secret for line in lines for secret in line.secrets]
    return text, ok, expected, "authorization" in kinds, secrets


# ------------------------------------------------------------------------------ the form


ODD_NAMES = ["", "   ", "x" * 100, "x" * 101, " x ", "existing", "stored", "a\x00b"]
ODD_NAMES += ["sse", "messages", "a/b", "a\tb"]  # shadowed or split at /mcp/<name>/
names = weighted(
    (st.from_regex(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,30}", fullmatch=True), 12),
    (st.sampled_from(ODD_NAMES), 2),
    (st.text(max_size=110), 2),
)
choices = {
    "transport": weighted((st.sampled_from(Transport.values), 8), (st.text(max_size=15), 1)),
    "approval_mode": weighted(
        (st.sampled_from(ApprovalMode.values), 8),
        (st.sampled_from(["", "ALWAYS_ASK", "always ask", "auto"]) | st.text(max_size=15), 1),
    ),
}


@dataclass
class Submission:
    data: dict
    ok: bool | None
    errors_in: set  # fields that must carry an error when the form is refused for them
    expected: dict
    secrets: list


@st.composite
def submissions(draw, editing=False):
    name = draw(names)
    description = draw(
        weighted((st.text(string.printable, max_size=40), 4), (st.text(max_size=40), 1))
    )
    url = draw(urls()) if not editing else draw(weighted((st.just(Field("")), 1), (urls(), 2)))
    token = draw(tokens())
    headers_text, headers_ok, headers, has_auth, header_secrets = draw(headers_texts())
    transport = draw(choices["transport"])
    mode = draw(choices["approval_mode"])
    flags = {flag: draw(st.booleans()) for flag in BOOLEANS}

    if editing and not url.value.strip():
        url_ok = True  # blank keeps the stored URL
    elif url.ok is None:
        url_ok = None
    else:
        url_ok = (
            url.ok
            and (flags["allow_http"] or not url.needs_http)
            and (flags["allow_private_network"] or not url.needs_private)
        )
    stripped_name = name.strip()
    taken = {"existing", "stored"} - ({"stored"} if editing else set())
    oks = {
        "name": 0 < len(stripped_name) <= 100
        and stripped_name.isprintable()  # no NUL or other control character
        and "/" not in stripped_name  # a server's MCP URL is /mcp/<name>/
        and stripped_name not in {"sse", "messages", *taken},
        "description": "\x00" not in description,
        "url": url_ok,
        "transport": transport in Transport.values,
        "approval_mode": mode in ApprovalMode.values,
        "secret_token": token.ok,
        "headers_text": headers_ok,
    }
    # Authorization comes from the token: a header of that name is refused while one is set.
    certainly_refused = False
    if has_auth:
        if editing and not flags["clear_secret_token"]:
            oks["headers_text"] = False  # the stored token stays
        elif token.value.strip() and token.ok:
            oks["headers_text"] = False
        elif token.value.strip() and token.ok is None:
            certainly_refused = True  # for the token or for the header, whichever
    ok = False if certainly_refused else _all(*oks.values())

    data = {
        "name": name,
        "description": description,
        "url": url.value,
        "transport": transport,
        "secret_token": token.value,
        "headers_text": headers_text,
        "approval_mode": mode,
        **{flag: "on" for flag, on in flags.items() if on},
    }
    stored_headers = STORED_HEADERS if editing and not flags["clear_headers"] else {}
    expected = {
        "name": stripped_name,
        "description": description.strip(),
        "url": url.value.strip() or STORED_URL,
        "transport": transport,
        "approval_mode": mode,
        "secret_token": token.value.strip()
        or (STORED_TOKEN if editing and not flags["clear_secret_token"] else ""),
        "headers": headers or stored_headers,
        "enabled": flags["enabled"],
        "allow_http": flags["allow_http"],
        "allow_private_network": flags["allow_private_network"],
    }
    errors_in = {field_name for field_name, field_ok in oks.items() if field_ok is False}
    secrets = [*url.secrets, *token.secrets, *header_secrets]
    return Submission(data, ok, errors_in, expected, secrets)


# ------------------------------------------------------------------------------ checks


@pytest.fixture
def stored(db):
    McpServer.objects.create(name="existing", url="https://existing.example.com/mcp")
    return McpServer.objects.create(
        name="stored", url=STORED_URL, secret_token=STORED_TOKEN, headers=STORED_HEADERS
    )


@pytest.fixture(autouse=True)
def no_dns(monkeypatch):
    async def resolve(host, port):
        if host == "localhost":
            return [netguard.parse_ip_literal("127.0.0.1")]
        raise OSError("Name or service not known")

    monkeypatch.setattr(netguard, "resolve_host", resolve)


@contextmanager
def rolled_back():
    with transaction.atomic():
        yield
        transaction.set_rollback(True)


def servers():
    return {server.pk: server_values(server) for server in McpServer.objects.all()}


def server_values(server):
    return {
        "name": server.name,
        "description": server.description,
        "url": server.url,
        "transport": server.transport,
        "approval_mode": server.approval_mode,
        "secret_token": server.secret_token,
        "headers": server.headers,
        "enabled": server.enabled,
        "allow_http": server.allow_http,
        "allow_private_network": server.allow_private_network,
    }


def assert_usable(values):
    """What the form accepted, the HTTP client can send: the URL and every header."""
    httpx2.URL(values["url"])
    headers = dict(values["headers"])
    if values["secret_token"]:
        headers["Authorization"] = f"Bearer {values['secret_token']}"
    httpx2.Headers(headers)


def assert_no_secret_in(html, secrets):
    for secret in secrets:
        assert secret not in html, f"{secret!r} is shown back in the page"


# ------------------------------------------------------------------------------ properties

VALID_DATA = {
    "name": "pinned",
    "description": "",
    "url": "https://mcp.example.com/mcp",
    "transport": "auto",
    "secret_token": "",
    "headers_text": "",
    "approval_mode": "always_ask",
}


def refused(field_name, value, secret):
    """A submission that must be refused for `field_name` and never show `secret` back."""
    return Submission({**VALID_DATA, field_name: value}, False, {field_name}, {}, [secret])


def pinned(test):
    """Inputs that once failed, run first whatever the derandomized draw."""
    for submission in [
        # The URL parser's message quoted the port, or the netloc with the password in it.
        refused("url", "https://mcp.example.com:SECRETport1/mcp", "SECRETport1"),
        refused("url", "https://user:SECRETpass1\uff03@mcp.example.com/mcp", "SECRETpass1"),
        # Accepted, then every sync failed: HTTP header values are ASCII only.
        refused("secret_token", "SECRETtoken1\u00e9", "SECRETtoken1"),
        refused("secret_token", "SECRETtoken2\u00a0x", "SECRETtoken2"),
        refused("headers_text", "X-Api-Key: SECRETheader1\u20ac", "SECRETheader1"),
    ]:
        test = example(submission=submission)(test)
    return test


@PROPERTIES
@given(submission=submissions())
@pinned
def test_the_form_accepts_exactly_what_the_rules_allow_and_saves_it_normalised(stored, submission):
    with rolled_back():
        before = servers()
        form = McpServerForm(data=submission.data)
        valid = form.is_valid()
        event(f"form valid: {valid}")
        html = without_typed_url(form.as_div()) + str(form.errors) + str(form.non_field_errors())
        assert_no_secret_in(html, submission.secrets)
        if submission.ok is not None:
            assert valid == submission.ok, (form.errors, submission.data)
        if not valid:
            assert form.errors
            assert submission.errors_in <= set(form.errors), form.errors
            for messages in form.errors.values():
                assert all(str(message).strip() for message in messages)
            assert servers() == before
            return
        server = form.save()
        after = servers()
        assert set(after) - set(before) == {server.pk}
        assert {pk: values for pk, values in after.items() if pk != server.pk} == before
        server.refresh_from_db()  # the encrypted fields, read back
        assert server_values(server) == submission.expected
        assert_usable(submission.expected)


@PROPERTIES
@given(submission=submissions())
@pinned
def test_the_admin_add_page_never_fails_and_never_shows_a_secret_back(
    stored, admin_user, submission
):
    with rolled_back(), mock.patch.object(McpServer, "request_sync", autospec=True) as sync:
        client = Client()  # a fresh session: no messages from an earlier example
        client.force_login(admin_user)
        before = servers()
        response = client.post(ADD_URL, {**submission.data, **INLINE_MANAGEMENT})
        after = servers()
    event(f"admin add: {response.status_code}")
    assert response.status_code in (200, 302), response.status_code
    html = without_typed_url(response.content.decode())
    assert_no_secret_in(html, [*submission.secrets, *STORED_SECRETS])
    if submission.ok is not None:
        assert (response.status_code == 302) == submission.ok, html[:3000]
    if response.status_code == 200:
        assert "errornote" in html  # "Please correct the errors below."
        assert after == before
        assert not sync.called
        return
    [new] = set(after) - set(before)
    assert {pk: values for pk, values in after.items() if pk != new} == before
    assert after[new] == submission.expected
    assert sync.call_count == (1 if submission.expected["enabled"] else 0)
    assert_usable(after[new])


@settings(PROPERTIES, max_examples=PROPERTIES.max_examples * 2 // 3)
@given(submission=submissions(editing=True))
@pinned
def test_the_admin_change_page_keeps_stored_secrets_and_a_refusal_changes_nothing(
    stored, admin_user, submission
):
    with rolled_back(), mock.patch.object(McpServer, "request_sync", autospec=True):
        client = Client()
        client.force_login(admin_user)
        before = servers()
        response = client.post(
            f"/admin/integrations/mcpserver/{stored.pk}/change/",
            {**submission.data, **INLINE_MANAGEMENT},
        )
        after = servers()
    event(f"admin change: {response.status_code}")
    assert response.status_code in (200, 302), response.status_code
    html = without_typed_url(response.content.decode())
    assert_no_secret_in(html, [*submission.secrets, *STORED_SECRETS])
    if submission.ok is not None:
        assert (response.status_code == 302) == submission.ok, html[:3000]
    if response.status_code == 200:
        assert "errornote" in html
        assert after == before
        return
    assert set(after) == set(before)
    assert after[stored.pk] == submission.expected
    assert {pk: values for pk, values in after.items() if pk != stored.pk} == {
        pk: values for pk, values in before.items() if pk != stored.pk
    }
    assert_usable(after[stored.pk])
