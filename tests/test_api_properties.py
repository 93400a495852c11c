"""Property-based tests of the agent API (issue 5).

Whatever an agent sends - any bytes, any JSON, any method, Authorization header, `?wait=` or
call id - the API answers 2xx, or 4xx with `{"error": {"code": …, "message": …}}`, and never
5xx. A 4xx changes nothing: no tool, server or agent changes, no call moves, and the only row
it may add is the `blocked` audit record of a policy refusal (403/404/422). A 201 adds exactly
the call it returns.

Every example runs in a savepoint that is rolled back afterwards, so examples are independent
and each one compares the database just before and just after its single request.

Reproducibility: the examples are derandomized (`derandomize=True`, no example database)
rather than drawn at random with a saved database of failures. CI runs exactly the same inputs
on every machine and every run, so a failure reproduces from the test name alone and nobody
has to keep or share a `.hypothesis/` folder; failing inputs found once are pinned with
`@example`. The price is that a run never explores anything new: set
TOOLGATE_HYPOTHESIS_EXPLORE=1 to draw fresh random examples, and more of them, locally.

Nothing runs: the servers are in Always Ask mode, or Fine-Grained with one auto-approved tool
whose enqueueing is captured (on-commit callbacks of a transaction that never commits), so no
worker or network is needed.
"""

import json
import re
from contextlib import contextmanager, suppress
from decimal import Decimal
from types import SimpleNamespace
from urllib.parse import quote

import pytest
from django.db import transaction
from django.test import Client
from django.utils import timezone
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from approvals import wakeup
from approvals.api import MAX_BODY_DEPTH
from approvals.models import Refused, Status, ToolCall, request_tool_call
from integrations.models import (
    Agent,
    ApprovalMode,
    McpServer,
    Tool,
    ToolApproval,
    ToolRevision,
)
from tests.conftest import HYPOTHESIS_PROPERTIES as PROPERTIES

pytestmark = pytest.mark.django_db


# The keys of a call object (test_api.py::test_a_call_needing_approval_is_pending). A superset
# is allowed: new keys may be added without breaking agents.
CALL_KEYS = {
    "id", "status", "server", "tool", "arguments", "decision", "result", "error",
    "created_at", "started_at", "finished_at", "expires_at",
}  # fmt: skip

ECHO = {
    "name": "echo",
    "description": "Echo text back.",
    "inputSchema": {
        "type": "object",
        "properties": {
            "text": {"type": "string", "maxLength": 100},
            "count": {"type": "integer", "minimum": 0},
            "options": {
                "type": "object",
                "properties": {
                    "mode": {"enum": ["fast", "slow"]},
                    "depth": {"type": "integer", "minimum": 1, "maximum": 5},
                },
                "required": ["mode"],
                "additionalProperties": False,
            },
        },
        "required": ["text", "count"],
    },
}
DELETE = {
    "name": "delete_file",
    "inputSchema": {"type": "object", "properties": {"path": {"type": "string"}}},
    "annotations": {"destructiveHint": True},
}
EMPTY = {"name": "gone", "inputSchema": {"type": "object"}}
BLOCKED = {"name": "blocked", "inputSchema": {"type": "object"}}

SERVER_NAMES = ["demo", "auto", "offline", "private"]
TOOL_NAMES = ["echo", "delete_file", "gone", "blocked"]
CALL_REFS = ["bot_pending", "bot_approved", "bot_cancelled", "bot_blocked", "other_pending"]


# ------------------------------------------------------------------------------ the world


def _server(name, mode, **fields):
    server = McpServer.objects.create(
        name=name, url=f"https://{name}.example.com/mcp", approval_mode=mode, **fields
    )
    now = timezone.now()
    for definition in (ECHO, DELETE, EMPTY, BLOCKED):
        Tool.objects.create_from_definition(server, definition, now)
    server.tools.filter(name="gone").update(removed_at=now)
    server.tools.filter(name="blocked").update(approval=ToolApproval.DISABLED)
    return server


def _agent(name, servers, active=True):
    return Agent.create_with_token(name, servers, is_active=active)


@pytest.fixture
def world(settings):
    """Servers in every state, three agents and calls in several states."""
    settings.AGENT_RATE_LIMIT = 10**9  # thousands of requests a minute; 429 is test_api's job
    demo = _server("demo", ApprovalMode.ALWAYS_ASK)
    auto = _server("auto", ApprovalMode.FINE_GRAINED)
    auto.tools.filter(name="echo").update(approval=ToolApproval.AUTO_APPROVED)
    offline = _server("offline", ApprovalMode.ALWAYS_ASK, enabled=False)
    private = _server("private", ApprovalMode.ALWAYS_ASK)
    bot, bot_token = _agent("bot", [demo, auto, offline])
    other, other_token = _agent("other", [demo, private])
    _, inactive_token = _agent("inactive", [demo], active=False)

    good = {"text": "hi", "count": 1}
    calls = {
        "bot_pending": request_tool_call(bot, "demo", "echo", good, "k1")[0],
        "bot_approved": request_tool_call(bot, "auto", "echo", good, "k2")[0],
        "bot_cancelled": request_tool_call(bot, "demo", "echo", good)[0],
        "other_pending": request_tool_call(other, "demo", "echo", good, "k1")[0],
    }
    calls["bot_cancelled"].cancel()
    with suppress(Refused):  # the refusal leaves the blocked row wanted here
        request_tool_call(bot, "nope", "echo", good)
    calls["bot_blocked"] = ToolCall.objects.get(status=Status.BLOCKED)
    assert calls["bot_approved"].status == Status.APPROVED
    return SimpleNamespace(
        agents={"bot": bot, "other": other},
        tokens={"bot": bot_token, "other": other_token, "inactive": inactive_token},
        calls=calls,
        client=Client(),  # raises a view's exception: a 500 fails with its stack trace
    )


@contextmanager
def rolled_back(capture):
    """A savepoint undone afterwards. Yields a list that, once the block is over, holds the
    work enqueued on commit inside it (checks run after the block, on snapshots). The rings
    that tell waiters a call is final (approvals/wakeup.py) are left out: they are not work."""
    enqueued = []
    with transaction.atomic():
        with capture(execute=False) as callbacks:
            yield enqueued
        enqueued.extend(c for c in callbacks if getattr(c, "func", None) is not wakeup._ring_now)
        transaction.set_rollback(True)


def snapshot():
    return {
        "calls": {row["id"]: row for row in ToolCall.objects.values()},
        "tools": list(Tool.objects.order_by("pk").values()),
        "revisions": list(ToolRevision.objects.order_by("pk").values()),
        "servers": list(McpServer.objects.order_by("pk").values()),
        # Recording when an agent was last seen is bookkeeping of any authenticated request.
        "agents": [
            {name: value for name, value in agent.items() if name != "last_used_at"}
            for agent in Agent.objects.order_by("pk").values()
        ],
        "agent_servers": sorted(Agent.servers.through.objects.values_list("agent", "mcpserver")),
    }


def _without(snap, key):
    return {name: value for name, value in snap.items() if name != key}


# ------------------------------------------------------------------------------ strategies


def weighted(*choices):
    """One of the strategies, drawn with the given weights: `st.one_of` picks its branches
    about evenly (and merges repeated ones). Shrinks towards the first."""
    indexes = [index for index, (_, weight) in enumerate(choices) for _ in range(weight)]
    return st.sampled_from(indexes).flatmap(lambda index: choices[index][0])


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)  # dumped as NaN / Infinity tokens
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

# Arguments for `echo`: valid ones, and each field right or wrong in type, range or shape.
options = st.fixed_dictionaries(
    {},
    optional={
        "mode": st.sampled_from(["fast", "slow", "medium", "FAST", ""]) | json_scalars,
        "depth": st.integers(-1, 7) | json_scalars,
        "extra": json_scalars,
    },
)
echo_arguments = st.fixed_dictionaries(
    {},
    optional={
        "text": st.text(max_size=110) | json_scalars,
        "count": st.integers(-3, 10**30) | json_scalars,
        "options": options | json_values,
    },
)
valid_echo_arguments = st.fixed_dictionaries(
    {"text": st.text(max_size=100), "count": st.integers(0, 10**18)},
    optional={
        "options": st.fixed_dictionaries(
            {"mode": st.sampled_from(["fast", "slow"])}, optional={"depth": st.integers(1, 5)}
        ),
        "note": json_values,  # additional properties are allowed at the top
    },
)
idempotency_keys = (
    st.none()
    | st.sampled_from(["", "k1", "k2", "k3", "x" * 200, "x" * 201])
    | st.text(max_size=40)
    | json_scalars
)
near_valid_bodies = st.fixed_dictionaries(
    {
        "server": weighted(
            (st.sampled_from([*SERVER_NAMES, "nope", "", "DEMO", " demo", "x" * 101]), 4),
            (json_values, 1),
        ),
        "tool": weighted((st.sampled_from([*TOOL_NAMES, "nope", "", "ECHO"]), 4), (json_values, 1)),
    },
    optional={
        "arguments": weighted((echo_arguments, 3), (json_values, 1)),
        "idempotency_key": idempotency_keys,
    },
).flatmap(  # now and then a field missing, or one the API does not know
    lambda body: weighted(
        (st.just(body), 8),
        (st.sampled_from(sorted(body)).map(lambda key: {k: body[k] for k in body if k != key}), 1),
        (
            st.dictionaries(st.text(max_size=8), json_values, min_size=1, max_size=2).map(
                lambda extra: {**extra, **body}
            ),
            1,
        ),
    )
)
valid_bodies = st.fixed_dictionaries(
    {},
    optional={
        "server": weighted(
            (st.sampled_from([*SERVER_NAMES, "nope", "", "DEMO", " demo", "x" * 101]), 4),
            (json_values, 1),
        ),
        "tool": weighted((st.sampled_from([*TOOL_NAMES, "nope", "", "ECHO"]), 4), (json_values, 1)),
        "arguments": weighted((echo_arguments, 3), (json_values, 1)),
        "idempotency_key": idempotency_keys,
    },
).flatmap(  # now and then a field the API does not know
    lambda body: weighted(
        (st.just(body), 6),
        (st.dictionaries(st.text(max_size=8), json_values, min_size=1, max_size=2), 1),
    ).map(lambda extra: body if extra is body else {**extra, **body})
)
valid_bodies = st.fixed_dictionaries(
    {},
    optional={
        "server": st.sampled_from([*SERVER_NAMES, "nope", "", "DEMO", " demo"]) | json_values,
        "tool": st.sampled_from([*TOOL_NAMES, "nope", "", "ECHO"]) | json_values,
        "arguments": echo_arguments | json_values,
        "idempotency_key": idempotency_keys,
        "surprise": json_values,
    },
)
valid_bodies = st.fixed_dictionaries(
    {"server": st.sampled_from(["demo", "auto"]), "tool": st.just("echo")},
    optional={"arguments": valid_echo_arguments, "idempotency_key": idempotency_keys},
)


def dumped(values):
    """JSON text of the values, ASCII-escaped or as raw UTF-8."""
    return st.builds(
        lambda value, ascii_only: json.dumps(value, ensure_ascii=ascii_only).encode(),
        values,
        st.booleans(),
    )


# Tokens that a JSON parser may accept but nothing downstream can store or send back.
TRICKY_TOKENS = [
    "NaN", "-NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1E400", "1e-999", "-0",
    "1" * 4300, "1" * 4301, "0.1e1", "[]", "{}", "null", "true",
    '"\\ud800"', '"\\udfff"', '"a\\udc00b"', '"\\ud83d\\ude00"', '"\\u0000"', '"a\\u0000"',
    '"\\x"', '"\\u00"', '"\u2028"', '"\x01"', '"\ufeff"',
]  # fmt: skip
TEMPLATES = [
    '{"server": %s, "tool": "echo", "arguments": {"text": "a", "count": 1}}',
    '{"server": "demo", "tool": %s, "arguments": {"text": "a", "count": 1}}',
    '{"server": "demo", "tool": "echo", "arguments": {"text": %s, "count": 1}}',
    '{"server": "demo", "tool": "echo", "arguments": {"text": "a", "count": %s}}',
    '{"server": "demo", "tool": "echo", "arguments": {"text": "a", "count": 1, "x": %s}}',
    '{"server": "auto", "tool": "echo", "arguments": {"text": "a", "count": 1, "x": [%s]}}',
    '{"server": "demo", "tool": "echo", "arguments": {%s: 1, "text": "a", "count": 1}}',
    '{"server": "nope", "tool": "echo", "arguments": {"x": %s}}',
    '{"server": "private", "tool": "echo", "arguments": {"x": %s}}',
    '{"server": "demo", "tool": "blocked", "arguments": {"x": %s}}',
    '{"server": "demo", "tool": "echo", "arguments": {"text": "a", "count": 1}, '
    '"idempotency_key": %s}',
    "%s",
]
tricky_bodies = st.builds(
    lambda template, token: (template % token).encode(),
    st.sampled_from(TEMPLATES),
    st.sampled_from(TRICKY_TOKENS),
)

NESTING = [63, 64, 65, 66, 100, 200, 250, 255, 256, 257, 300, 500, 800, 900, 950, 990, 1000,
           1500, 5000, 100_000]  # fmt: skip


def _nested(kind, levels):
    if kind == "list":
        return "[" * levels + "]" * levels
    return '{"a": ' * levels + "1" + "}" * levels


deep_bodies = st.builds(
    lambda template, kind, levels: (template % _nested(kind, levels)).encode(),
    st.sampled_from([*TEMPLATES[4:10], "%s"]),
    st.sampled_from(["list", "dict"]),
    st.sampled_from(NESTING),
)


def _huge(where, size):
    """A body `size` bytes longer than API_MAX_BODY_BYTES (shorter when negative)."""
    from django.conf import settings as django_settings

    total = django_settings.API_MAX_BODY_BYTES + size
    body = {"server": "demo", "tool": "echo", "arguments": {"text": "", "count": 1}}
    field = {"text": ("arguments", "text"), "server": ("server",), "key": ("idempotency_key",)}
    path = field[where]
    target = body
    for name in path[:-1]:
        target = target[name]
    target[path[-1]] = ""
    filler = total - len(json.dumps(body))
    target[path[-1]] = "x" * filler
    raw = json.dumps(body).encode()
    assert len(raw) == total
    return raw


huge_bodies = st.builds(
    _huge,
    st.sampled_from(["text", "server", "key"]),
    # Relative to API_MAX_BODY_BYTES: just under, at, just over, beyond Django's own cap.
    st.sampled_from([-200_000, -100, 0, 1, 2 * 1024 * 1024]),
)

prefixes = st.sampled_from([b"", b" \n\t", b"\xef\xbb\xbf", b"\x00", b"\xff"])
suffixes = st.sampled_from([b"", b" ", b"\n", b"x", b"}", b"\x00", b"{}"])
framed_bodies = st.builds(
    lambda prefix, body, suffix: prefix + body + suffix,
    prefixes,
    dumped(valid_bodies) | dumped(near_valid_bodies),
    suffixes,
)

duplicate_keys = st.builds(  # the same key twice: the last one wins in Python's parser
    lambda server, tool: (
        f'{{"server": "demo", "server": {server}, "tool": "echo", "arguments": '
        f'{{"text": "a", "count": 1}}, "tool": {tool}}}'.encode()
    ),
    st.sampled_from(['"demo"', '"nope"', "1"]),
    st.sampled_from(['"echo"', '"blocked"', "null"]),
)
# About a third of the bodies are valid calls and a third near-valid, so that 2xx and policy
# refusals get their share of the examples.
bodies = weighted(
    (dumped(valid_bodies), 6),
    (dumped(near_valid_bodies), 6),
    (tricky_bodies, 3),
    (deep_bodies, 2),
    (framed_bodies, 1),
    (huge_bodies, 1),
    (dumped(json_values), 1),
    (st.binary(max_size=300), 1),
    (st.text(max_size=300).map(str.encode), 1),
    (duplicate_keys, 1),
)

content_types = st.sampled_from(
    ["application/json", "application/json; charset=utf-16", "text/plain",
     "multipart/form-data; boundary=x", "application/x-www-form-urlencoded", ""]
)  # fmt: skip


def _slow(raw):
    """A `wait` the API accepts and would actually wait for: kept out to stay fast."""
    try:
        seconds = float(raw)
    except ValueError:
        return False
    return 0.05 < seconds <= 60


BAD_WAITS = ["", "nan", "NaN", "inf", "-inf", "infinity", "-1", "-0.0001", "60.0001", "61",
             "1e9", "1e999", "0x10", "soon", "1,5", "\u0660\u066b\u0660\u0661x", "0.01s",
             "\x00"]  # fmt: skip
ODD_QUERIES = ["wait", "wait=", "wait=0&wait=x", "wait=x&wait=0", "wait=%zz", "wait=%ff", "&&", "=",
               "wait=0;1"]  # fmt: skip

# (query string, whether the wait in it is valid; None: not decided here)
no_wait = st.just(("", True))
good_waits = st.one_of(
    st.sampled_from(["0", "0.0", "-0", "0.01", "5e-2", " 0.02 ", "0_0", "0.050"]).map(
        lambda raw: (f"wait={quote(raw)}", True)
    ),
    st.floats(0, 0.05).map(lambda seconds: (f"wait={seconds!r}", True)),
)
bad_waits = st.one_of(
    st.sampled_from(BAD_WAITS).map(lambda raw: (f"wait={quote(raw)}", False)),
    st.text(max_size=12)
    .filter(lambda raw: not _slow(raw))
    .map(lambda raw: (f"wait={quote(raw)}", None)),
    st.sampled_from(ODD_QUERIES).map(lambda qs: (qs, None)),
)
# Mostly acceptable, so that most requests get past the wait to the body.
waits = weighted((no_wait, 4), (good_waits, 2), (bad_waits, 1))


@st.composite
def authorizations(draw, valid_share=0.5):
    """(spec of an Authorization header, the agent it authenticates or None).

    A spec is None (no header), ("raw", text) or ("token", owner, prefix, transform, suffix):
    the tokens only exist once the `world` fixture has made the agents.
    """
    kind = draw(
        weighted(
            (st.just("valid"), round(valid_share * 20)),
            (
                st.sampled_from(["missing", "junk", "bearer_junk", "mangled"]),
                20 - round(valid_share * 20),
            ),
        )
    )
    latin1 = st.text(st.characters(max_codepoint=255), max_size=60)  # what a server passes on
    if kind == "missing":
        return None, None
    if kind == "junk":
        return ("raw", draw(latin1)), None
    if kind == "bearer_junk":
        prefix = draw(st.sampled_from(["Bearer ", "Bearer tg_", "bearer  ", "Bearer\t"]))
        return ("raw", prefix + draw(latin1)), None
    scheme = draw(st.sampled_from(["Bearer", "bearer", "BEARER", "bEaReR"]))
    if kind == "valid":
        who = draw(st.sampled_from(["bot", "other"]))
        space = draw(st.sampled_from([" ", "  ", " \t"]))
        trail = draw(st.sampled_from(["", " ", "\t", "  "]))
        return ("token", who, scheme + space, "same", trail), who
    who = draw(st.sampled_from(["bot", "other", "inactive"]))
    prefix, transform, suffix = draw(
        st.sampled_from(
            [
                (f"{scheme} ", "same", ""),  # right token, but the agent may be inactive
                (f"{scheme} ", "upper", ""),
                (f"{scheme} ", "chop", ""),
                (f"{scheme} ", "same", "x"),
                ("", "same", ""),
                ("Basic ", "same", ""),
                (scheme, "same", ""),
                (f"{scheme},", "same", ""),
            ]
        )
    )
    valid = who != "inactive" and (prefix, transform, suffix) == (f"{scheme} ", "same", "")
    return ("token", who, prefix, transform, suffix), (who if valid else None)


def auth_header(world, spec):
    if spec is None:
        return None
    if spec[0] == "raw":
        return spec[1]
    _, owner, prefix, transform, suffix = spec
    token = world.tokens[owner]
    token = {"same": token, "upper": token.upper(), "chop": token[:-1]}[transform]
    return prefix + token + suffix


def send(world, method, path, query, body=b"", content_type="application/json", auth=None):
    headers = {"Authorization": auth} if auth is not None else {}
    url = f"{path}?{query}" if query else path
    return world.client.generic(method, url, body, content_type=content_type, headers=headers)


# ------------------------------------------------------------------------------ checks


def strict_json(response):
    """The response body, parsed as strict JSON (no NaN / Infinity tokens)."""
    assert response["Content-Type"].startswith("application/json"), response.content[:200]

    def refuse(token):
        raise AssertionError(f"non-JSON token {token} in the response")

    return json.loads(response.content, parse_constant=refuse)


def assert_clear_error(data):
    assert set(data) == {"error"}, data
    error = data["error"]
    assert isinstance(error["code"], str) and error["code"], error
    assert isinstance(error["message"], str) and error["message"].strip(), error


def assert_only_calls_changed(before, after):
    assert _without(after, "calls") == _without(before, "calls")


def new_calls(before, after):
    return {pk: row for pk, row in after["calls"].items() if pk not in before["calls"]}


def assert_old_calls_unchanged(before, after, except_for=()):
    for pk, row in before["calls"].items():
        if pk not in except_for:
            assert after["calls"][pk] == row, pk


def same_json(value):
    """A JSON value with numbers compared as the decimals they are written as: PostgreSQL's
    jsonb gives 2.663235537877311e+16 back as the integer 26632355378773110, the same number."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    if isinstance(value, list):
        return [same_json(item) for item in value]
    return {key: same_json(item) for key, item in value.items()}


def parsed_body(body):
    """The body as the API's parser reads it, or None where it would not get a dict."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def check_tool_call_post(world, response, before, after, callbacks, body, who, wait_ok):
    """Everything a POST /api/v1/tool-calls answer must satisfy, whatever was sent."""
    status = response.status_code
    event(f"POST tool-calls: {status}")
    assert status < 500
    data = strict_json(response)
    if status == 400:
        event("   400: " + data["error"]["message"][:30])
    assert_only_calls_changed(before, after)
    created = new_calls(before, after)
    if who is None:
        assert status == 401, data
    elif wait_ok is False:
        assert status == 400 and "wait must be" in data["error"]["message"], data

    if 400 <= status < 500:
        assert_clear_error(data)
        assert_old_calls_unchanged(before, after)
        assert not callbacks, "a refused request must not enqueue anything"
        if status in (403, 404, 422):  # refused by the policy: exactly one audit row
            [row] = created.values()
            assert row["status"] == Status.BLOCKED
            assert row["decided_by"] == "policy"
            assert row["error_code"] == data["error"]["code"]
            assert row["idempotency_key"] == ""  # a refusal does not claim the key
            assert row["agent_id"] == world.agents[who].pk
        else:
            assert not created, (status, data)
        return

    assert status in (200, 201), status
    posted = parsed_body(body)
    assert who is not None and posted is not None
    assert set(data) >= CALL_KEYS, set(data)
    assert_old_calls_unchanged(before, after)
    if status == 201:
        [(pk, row)] = created.items()
        assert data["id"] == pk
        assert row["agent_id"] == world.agents[who].pk
        assert (row["server_name"], row["tool_name"]) == (posted["server"], posted["tool"])
        assert (data["server"], data["tool"]) == (posted["server"], posted["tool"])
        arguments = same_json(posted.get("arguments") or {})
        assert same_json(row["arguments"]) == same_json(data["arguments"]) == arguments
        assert row["idempotency_key"] == (posted.get("idempotency_key") or "")
        assert data["status"] == row["status"]
        assert row["status"] in (Status.PENDING_APPROVAL, Status.APPROVED)
        assert len(callbacks) == (row["status"] == Status.APPROVED)
    else:  # an idempotency key used before: the earlier call, and nothing new
        assert not created and not callbacks
        key = posted.get("idempotency_key")
        existing = before["calls"][data["id"]]
        assert key and existing["idempotency_key"] == key
        assert existing["agent_id"] == world.agents[who].pk


# ------------------------------------------------------------------------------ properties

REFUSED_DEEP = '{"server": "nope", "tool": "echo", "arguments": {"x": %s}}'
# An agent's token, as drawn by `authorizations()`.
BOT = (("token", "bot", "Bearer ", "same", ""), "bot")


@settings(PROPERTIES, max_examples=PROPERTIES.max_examples * 2)
@given(body=bodies, content_type=content_types, wait=waits, auth=authorizations(valid_share=0.85))
# Found by this test, pinned so they stay covered whatever the derandomized draw:
@example(  # 1e999 parses as inf: unstorable, and not JSON on the way out
    body=b'{"server": "demo", "tool": "echo", "arguments": {"text": "a", "count": 1, "x": 1e999}}',
    content_type="application/json", wait=("", True), auth=BOT,
)  # fmt: skip
@example(  # an unpaired surrogate escape is valid JSON syntax but not encodable as UTF-8
    body=b'{"server": "\\ud800", "tool": "echo"}',
    content_type="application/json", wait=("", True), auth=BOT,
)  # fmt: skip
@example(  # parses, but too deep for json.dumps once the ORM saves the audit row
    body=b'{"server": "nope", "tool": "echo", "arguments": {"x": '
    + b"[" * 900 + b"]" * 900 + b"}}",
    content_type="application/json", wait=("", True), auth=BOT,
)  # fmt: skip
@example(  # the deepest body accepted, kept whole in the audit row of a refusal
    body=(REFUSED_DEEP % _nested("list", MAX_BODY_DEPTH - 2)).encode(),
    content_type="application/json", wait=("", True), auth=BOT,
)  # fmt: skip
@example(  # one level deeper
    body=(REFUSED_DEEP % _nested("dict", MAX_BODY_DEPTH - 2)).encode(),
    content_type="application/json", wait=("", True), auth=BOT,
)  # fmt: skip
@example(  # PostgreSQL refuses NUL in text and in jsonb
    body=b'{"server": "demo\\u0000", "tool": "echo", "arguments": {"x": "\\u0000"}}',
    content_type="application/json", wait=("", True), auth=BOT,
)  # fmt: skip
def test_any_tool_call_request_gets_a_clear_answer_and_a_refusal_changes_nothing(
    world, django_capture_on_commit_callbacks, body, content_type, wait, auth
):
    query, wait_ok = wait
    if "utf-16" in content_type:
        wait_ok = None  # Django decodes the query string with the body's charset too
    with rolled_back(django_capture_on_commit_callbacks) as callbacks:
        before = snapshot()
        response = send(
            world,
            "POST",
            "/api/v1/tool-calls",
            query,
            body,
            content_type,
            auth_header(world, auth[0]),
        )
        after = snapshot()
    check_tool_call_post(world, response, before, after, callbacks, body, auth[1], wait_ok)


ALLOWED = {"tools": "GET", "tool_calls": "POST", "tool_call": "GET", "cancel": "POST"}
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
targets = st.tuples(
    st.sampled_from(["tools", "tool_calls", "tool_call", "cancel"]),
    st.sampled_from(CALL_REFS) | st.integers(0, 10**40),
    st.sampled_from(["{}", "{:05d}"]),  # leading zeros still name the same call
)
# The endpoint's own method more often than not: other methods only ever get 401 or 405.
targets_and_methods = targets.flatmap(
    lambda target: st.tuples(
        st.just(target), weighted((st.just(ALLOWED[target[0]]), 2), (st.sampled_from(METHODS), 1))
    )
)
small_bodies = st.one_of(
    st.just(b""), st.binary(max_size=40), dumped(json_values), dumped(near_valid_bodies)
)


def expected_status(kind, method, who, mine, wait_ok, call):
    """The status the API must answer with, where the inputs decide it."""
    if who is None:
        return 401
    if method != ALLOWED[kind]:
        return 405
    if kind == "tools":
        return 200
    if kind == "tool_call":
        if wait_ok is None:
            return None
        return (200 if mine else 404) if wait_ok else 400
    if kind == "cancel":  # ignores ?wait=
        if not mine:
            return 404
        return 200 if call.status == Status.PENDING_APPROVAL else 409
    return None  # POST tool-calls: check_tool_call_post knows


@PROPERTIES
@given(
    request=targets_and_methods,
    auth=authorizations(valid_share=0.7),
    wait=waits,
    body=small_bodies,
)
def test_any_request_to_any_endpoint_gets_a_clear_answer(
    world, django_capture_on_commit_callbacks, request, auth, wait, body
):
    (kind, ref, id_format), method = request
    if isinstance(ref, str):
        call = world.calls[ref]
    else:  # a number may still name one of the world's calls
        call = next((call for call in world.calls.values() if call.pk == ref), None)
    call_id = call.pk if call else ref
    path = {
        "tools": "/api/v1/tools",
        "tool_calls": "/api/v1/tool-calls",
        "tool_call": f"/api/v1/tool-calls/{id_format.format(call_id)}",
        "cancel": f"/api/v1/tool-calls/{id_format.format(call_id)}/cancel",
    }[kind]
    query, wait_ok = wait
    who = auth[1]
    mine = call is not None and who is not None and call.agent_id == world.agents[who].pk
    with rolled_back(django_capture_on_commit_callbacks) as callbacks:
        before = snapshot()
        response = send(world, method, path, query, body, auth=auth_header(world, auth[0]))
        after = snapshot()
    if kind == "tool_calls" and method == "POST":
        check_tool_call_post(world, response, before, after, callbacks, body, who, wait_ok)
        return
    status = response.status_code
    event(f"{method} {kind}: {status}")
    assert status < 500
    expected = expected_status(kind, method, who, mine, wait_ok, call)
    assert expected is None or status == expected, (status, expected)
    assert_only_calls_changed(before, after)
    assert not new_calls(before, after) and not callbacks
    data = None if method == "HEAD" else strict_json(response)  # HEAD has no body
    if status >= 400:
        if data is not None:
            assert_clear_error(data)
        assert_old_calls_unchanged(before, after)
        return

    if kind == "tools":
        listed = {(tool["server"], tool["name"]) for tool in data["tools"]}
        servers = {"bot": {"demo", "auto"}, "other": {"demo", "private"}}[who]
        assert listed == {(s, t) for s in servers for t in ("echo", "delete_file")}
        assert_old_calls_unchanged(before, after)
    elif kind == "tool_call":
        assert set(data) >= CALL_KEYS and data["id"] == call.pk
        assert_old_calls_unchanged(before, after)
    else:  # a cancel moved the agent's own pending call, and nothing else
        assert data["status"] == after["calls"][call.pk]["status"] == Status.CANCELLED
        assert_old_calls_unchanged(before, after, except_for={call.pk})


def test_the_world_is_what_the_properties_assume(world):
    statuses = {ref: call.status for ref, call in world.calls.items()}
    assert statuses == {
        "bot_pending": "pending_approval",
        "bot_approved": "approved",
        "bot_cancelled": "cancelled",
        "bot_blocked": "blocked",
        "other_pending": "pending_approval",
    }


junk_segments = st.text(
    st.characters(codec="utf-8", exclude_characters="/?#"), min_size=1, max_size=20
).filter(lambda segment: not re.fullmatch("[0-9]+", segment) and segment != "tools")


@PROPERTIES
@given(
    segment=junk_segments,
    shape=st.sampled_from(["/api/v1/tool-calls/{}", "/api/v1/tool-calls/{}/cancel", "/api/v1/{}"]),
)
def test_any_path_under_the_api_gets_a_json_error(world, segment, shape):
    path = shape.format(quote(segment))
    response = world.client.get(path, headers={"Authorization": f"Bearer {world.tokens['bot']}"})
    assert 400 <= response.status_code < 500
    assert_clear_error(strict_json(response))
