"""Hostile agents: malformed, mistyped and unstorable requests on the JSON API and the MCP
endpoint (both Streamable HTTP eras and SSE), sent raw to a live Toolgate. Every one is a
client fault: an HTTP 4xx or a JSON-RPC error with the right code (never 500 or -32603), and
nothing stored but the audit's blocked call where the policy refused a real request."""

import contextlib
import json
import re
import select
import socket

import anyio
import httpx2
import mcp_types as types
import pytest

from approvals.models import Status, ToolCall
from integrations.models import Agent, McpServer, ToolApproval
from tests.mcp_live import add_server, in_thread
from tests.mcp_servers import demo_server
from tests.test_mcp_endpoint import connect, run

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]

MODERN = "2026-07-28"
ENVELOPE = {
    "io.modelcontextprotocol/protocolVersion": MODERN,
    "io.modelcontextprotocol/clientInfo": {"name": "hostile", "version": "1"},
    "io.modelcontextprotocol/clientCapabilities": {},
}


@pytest.fixture
def agent(mcp_factory):
    demo = add_server("demo", mcp_factory(demo_server()).url)
    agent, token = Agent.create_with_token("bot", servers=[demo])
    agent.token = token
    return agent


class Raw:
    """An agent speaking JSON-RPC by hand: 2026-07-28 requests (`modern`), or the handshake era
    (`legacy`, on a session it opens first)."""

    def __init__(self, base_url, token, era, path="/mcp/demo/"):
        self.url, self.era = base_url + path, era
        self.headers = {
            "Authorization": f"Bearer {token}",
            "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json",
        }
        if era == "legacy":
            self._open_session()

    def _open_session(self):
        hello = {"protocolVersion": "2025-11-25", "capabilities": {},
                 "clientInfo": {"name": "hostile", "version": "1"}}  # fmt: skip
        answer = httpx2.post(self.url, headers=self.headers, json=_request("initialize", hello))
        assert answer.status_code == 200
        self.headers["Mcp-Session-Id"] = answer.headers["mcp-session-id"]
        self.headers["MCP-Protocol-Version"] = "2025-11-25"
        initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        assert httpx2.post(self.url, headers=self.headers, json=initialized).status_code == 202

    def send(self, method, params, *, body=None, name=None):
        """(HTTP status, the JSON-RPC message answered or None). `body` replaces the JSON."""
        headers = dict(self.headers)
        if self.era == "modern":
            params = {**params, "_meta": ENVELOPE}
            headers.update({"MCP-Protocol-Version": MODERN, "Mcp-Method": method})
            if name is not None:
                headers["Mcp-Name"] = name
        content = body(params) if body else json.dumps(_request(method, params))
        answer = httpx2.post(self.url, headers=headers, content=content, timeout=30)
        return answer.status_code, _message(answer)


def _request(method, params, request_id=1):
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}


def _call_body(name, arguments_json):
    def body(params):
        rest = json.dumps({**params, "name": name})[1:-1]
        params = f'{{{rest},"arguments":{arguments_json}}}'
        return f'{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{params}}}'

    return body


def _message(answer):
    text = answer.text
    if answer.headers.get("content-type", "").startswith("text/event-stream"):
        data = [line[5:] for line in text.splitlines() if line.startswith("data:")]
        text = data[-1] if data else ""
    try:
        return json.loads(text)
    except ValueError:
        return None


def assert_client_fault(status, message, code=types.INVALID_PARAMS):
    assert status < 500
    assert message["error"]["code"] == code, message


UNSTORABLE = ['"\\ud800"', '"a\\u0000b"', '{"a\\u0000": 1}', '["\\udfff"]']


@pytest.mark.parametrize("era", ["modern", "legacy"])
@pytest.mark.parametrize("arguments", UNSTORABLE)
def test_unstorable_text_in_mcp_arguments_is_invalid_params(toolgate, agent, era, arguments):
    """An unpaired surrogate crashed the save (-32603); \\u0000 went through here while the
    JSON API refused it, and PostgreSQL refuses it in text."""
    raw = Raw(toolgate.base_url, agent.token, era)
    status, message = raw.send(
        "tools/call", {}, body=_call_body("echo", f'{{"text": {arguments}}}'), name="echo"
    )
    if era == "legacy" and message["error"]["code"] == types.PARSE_ERROR:
        assert "\\ud" in arguments  # that era's parser refuses a lone surrogate itself
    else:
        assert_client_fault(status, message)
        assert "can't be used" in message["error"]["message"]
    assert not ToolCall.objects.exists()


@pytest.mark.parametrize("era", ["modern", "legacy"])
@pytest.mark.parametrize("name", ["a" * 129, "ec\u0000ho", "\ud800"])
def test_an_unusable_tool_name_is_a_client_error(toolgate, agent, era, name):
    """An over-long name was answered as a policy refusal (`isError`), not as invalid params.
    A NUL or a lone surrogate may be refused earlier by the SDK (parse error, or an Mcp-Name
    header that can't match), but never reaches a query or an internal error."""
    raw = Raw(toolgate.base_url, agent.token, era)
    header = name if name.isprintable() and name.isascii() else "x"
    status, message = raw.send("tools/call", {}, body=_call_body(name, "{}"), name=header)
    expected = [types.INVALID_PARAMS]
    if not name.isprintable() or not name.isascii():
        expected += [types.PARSE_ERROR, types.HEADER_MISMATCH]
    assert status < 500 and message["error"]["code"] in expected, message
    assert not ToolCall.objects.exists()


@pytest.mark.parametrize("path", ["/mcp/de%00mo/", "/mcp/de%00mo/sse", "/mcp/%ED%A0%80/"])
def test_a_nul_or_junk_in_the_server_name_of_the_url_is_not_found(toolgate, agent, path):
    headers = {"Authorization": f"Bearer {agent.token}", "Accept": "text/event-stream"}
    answer = httpx2.post(toolgate.base_url + path, headers=headers, json={}, timeout=10)
    assert answer.status_code == 404


@pytest.mark.parametrize("era", ["modern", "legacy"])
@pytest.mark.parametrize("task_id", ["toolcall-²", "toolcall-" + "9" * 40, "toolcall--1", "x"])
def test_a_junk_task_id_is_not_found(toolgate, agent, era, task_id):
    """ "²" passes str.isdigit() and int() refuses it: that was an internal error."""
    raw = Raw(toolgate.base_url, agent.token, era)
    if era == "legacy":
        status, message = raw.send("tasks/get", {"taskId": task_id})
        assert_client_fault(status, message)
        assert "no task" in message["error"]["message"]
    else:  # modern tasks are read with `tasks/get` of the tasks extension
        status, message = raw.send("tasks/get", {"taskId": task_id})
        assert_client_fault(status, message)


@pytest.mark.parametrize("era", ["modern", "legacy"])
def test_malformed_mcp_requests_are_client_errors(toolgate, agent, era):
    """A sweep of wrong types and shapes: each is answered with a JSON-RPC error that blames
    the client (or a 4xx), none is an internal error, and no call is stored."""
    raw = Raw(toolgate.base_url, agent.token, era)
    attacks = [
        ("tools/call", {"name": "add", "arguments": [1, 2]}, None),
        ("tools/call", {"name": "add", "arguments": "a=1"}, None),
        ("tools/call", {"name": 5, "arguments": {}}, None),
        ("tools/call", {"arguments": {}}, None),
        ("tools/call", {"name": "add", "arguments": {}, "task": "now"}, None),
        ("tasks/get", {"taskId": {"id": 1}}, None),
        ("tasks/list", {"cursor": {"a": 1}}, None),
        ("tasks/cancel", {"taskId": 7}, None),
    ]
    for method, params, name in attacks:
        name = params.get("name") if isinstance(params.get("name"), str) else name
        status, message = raw.send(method, params, name=name)
        assert status < 500, (method, params)
        if message is not None:
            assert message["error"]["code"] != types.INTERNAL_ERROR, (method, params, message)
    for body in [b"{not json", b"", b"\xff\xfe", b"[]", b"\x1f\x8b\x08\x00"]:
        answer = httpx2.post(raw.url, headers=raw.headers, content=body, timeout=10)
        assert 400 <= answer.status_code < 500, body
    assert not ToolCall.objects.exclude(status=Status.BLOCKED).exists()


def test_an_idempotency_key_reused_for_another_request_is_refused(toolgate, agent):
    """It used to answer 200 with the first call, which the agent took for its new one."""
    url = toolgate.base_url + "/api/v1/tool-calls"
    headers = {"Authorization": f"Bearer {agent.token}"}
    first = {"server": "demo", "tool": "add", "arguments": {"a": 1, "b": 2}, "idempotency_key": "k"}
    assert httpx2.post(url, headers=headers, json=first).status_code == 201
    assert httpx2.post(url, headers=headers, json=first).status_code == 200  # a true repeat
    for other in [
        {**first, "arguments": {"a": 1000, "b": 2}},
        {**first, "tool": "echo", "arguments": {"text": "x"}},
    ]:
        answer = httpx2.post(url, headers=headers, json=other)
        assert answer.status_code == 409
        assert answer.json()["error"]["code"] == "idempotency_key_reused"
    assert ToolCall.objects.count() == 1


@pytest.mark.parametrize("era", ["modern", "legacy"])
@pytest.mark.parametrize(
    "body",
    [
        {"jsonrpc": "2.0", "id": {"x": 1}, "method": "tools/list", "params": {}},
        {"jsonrpc": "2.0", "id": 1.5, "method": "tools/list", "params": {}},
        {"jsonrpc": "2.0", "id": True, "method": "tools/list", "params": {}},
        [{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}] * 2,
        [{"jsonrpc": "2.0", "method": "notifications/initialized"}],
        [],
    ],
)
def test_bad_ids_and_batches_are_invalid_requests(toolgate, agent, era, body):
    """The handshake era took a request with an object, float or boolean id for a
    notification (202, and never an answer) and answered batches as invalid params."""
    raw = Raw(toolgate.base_url, agent.token, era)
    status, message = raw.send("tools/list", {}, body=lambda params: json.dumps(body))
    assert status == 400
    assert message["error"]["code"] == types.INVALID_REQUEST
    assert message["id"] is None


def test_bad_ids_and_batches_on_an_sse_session_are_invalid_requests(toolgate, agent):
    headers = {"Authorization": f"Bearer {agent.token}"}
    with httpx2.stream("GET", toolgate.base_url + "/mcp/demo/sse", headers=headers) as stream:
        lines = stream.iter_lines()
        endpoint = next(line[5:].strip() for line in lines if line.startswith("data:"))
        for body in [{"jsonrpc": "2.0", "id": {"x": 1}, "method": "ping"}, [{"a": 1}]]:
            answer = httpx2.post(toolgate.base_url + endpoint, headers=headers, json=body)
            assert answer.status_code == 400
            assert answer.json()["error"]["code"] == types.INVALID_REQUEST


def test_the_same_mcp_call_sent_many_times_at_once_queues_one_request(toolgate, agent, settings):
    """A client that retries without waiting (or several of its sessions) must not flood the
    approvers: concurrent identical calls re-attach to one pending call."""
    settings.MCP_APPROVAL_HOLD = 1.0
    settings.MCP_PROGRESS_INTERVAL = 0.3
    McpServer.objects.filter(name="demo").update(approval_mode="always_ask")

    async def one():
        async with connect(f"{toolgate.base_url}/mcp/demo/", agent.token, "modern") as client:
            return await client.call_tool("echo", {"text": "same"})

    async def many():
        results = []

        async def collect():
            results.append(await one())

        async with anyio.create_task_group() as group:
            for _ in range(6):
                group.start_soon(collect)
        return results

    results = run(many)
    assert len({result.meta["toolgate/call"]["id"] for result in results}) == 1
    assert ToolCall.objects.count() == 1


def test_json_api_ids_tokens_and_bodies_that_are_wrong_are_client_errors(toolgate, agent):
    """Another agent's call, a call id no column can hold, the token in the query string, a
    body streamed without a length: each a 4xx, the first two the same 404 as an unknown id."""
    _, other_token = Agent.create_with_token("other", servers=[])
    base, mine = toolgate.base_url + "/api/v1", {"Authorization": f"Bearer {agent.token}"}
    call = httpx2.post(f"{base}/tool-calls", headers=mine, json={"server": "demo", "tool": "add",
                       "arguments": {"a": 1, "b": 2}}).json()  # fmt: skip
    theirs = {"Authorization": f"Bearer {other_token}"}
    answers = [
        httpx2.get(f"{base}/tool-calls/{call['id']}", headers=theirs),
        httpx2.post(f"{base}/tool-calls/{call['id']}/cancel", headers=theirs),
        httpx2.get(f"{base}/tool-calls/{'9' * 30}", headers=mine),
        httpx2.post(f"{base}/tool-calls/{'9' * 30}/cancel", headers=mine),
    ]
    assert [answer.status_code for answer in answers] == [404] * 4
    assert len({answer.json()["error"]["code"] for answer in answers}) == 1
    assert httpx2.get(f"{base}/tools?token={agent.token}").status_code == 401
    assert httpx2.get(f"{base}/tools?access_token={agent.token}").status_code == 401

    def streamed():
        for _ in range(40):
            yield b" " * 65536

    answer = httpx2.post(f"{base}/tool-calls", headers=mine, content=streamed())
    assert answer.status_code == 413


def _send_endless_body(port, path, headers=""):
    """POST a chunked body that never ends, 64 KiB at a time, until Toolgate answers (it
    must, long before the body could end); returns the status line, or None if it never did."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        chunk = b"10000\r\n" + b" " * 0x10000 + b"\r\n"
        for _ in range(3000):  # 200 MB at most
            if select.select([sock], [], [], 0)[0]:
                break
            try:
                sock.sendall(chunk)
            except OSError:  # it answered and closed: read what it said
                break
        else:
            return None
        with contextlib.suppress(OSError):
            return sock.recv(200).split(b"\r\n")[0].decode()
        return None


@pytest.mark.parametrize("path", ["/api/v1/tool-calls", "/admin/login/", "/approvals/1/decide"])
def test_an_endless_body_is_refused_before_anyone_is_known(toolgate, path):
    """Django's handler read whole bodies before any view ran, spooling them to disk without
    limit: anyone could fill the disk without a token or a login."""
    assert _send_endless_body(toolgate.port, path) == "HTTP/1.1 413 Request Entity Too Large"


def test_an_endless_body_to_the_mcp_endpoint_is_refused(toolgate, agent):
    status = _send_endless_body(
        toolgate.port, "/mcp/demo/", f"Authorization: Bearer {agent.token}\r\n"
    )
    assert status == "HTTP/1.1 413 Request Entity Too Large"


def test_slow_bodies_stall_no_other_agent(toolgate, agent):
    """Bodies that trickle in (or stop half-way) on every kind of endpoint, while another
    agent calls a tool over the JSON API and over MCP (where a small body is read before the
    agent's lookup, a larger one after)."""
    _, other = Agent.create_with_token("other", servers=McpServer.objects.all())
    slow = []
    for path, length in [("/api/v1/tool-calls", 100000), ("/mcp/demo/", 100000),
                         ("/mcp/demo/", 1000), ("/admin/login/", 100000),
                         ("/mcp/demo/messages/", 100000)]:  # fmt: skip
        sock = socket.create_connection(("127.0.0.1", toolgate.port), timeout=30)
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {agent.token}\r\n"
            "Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
            f'Content-Length: {length}\r\n\r\n{{"server": '.encode()
        )
        slow.append(sock)
    try:
        answer = httpx2.post(
            f"{toolgate.base_url}/api/v1/tool-calls?wait=30",
            headers={"Authorization": f"Bearer {other}"},
            json={"server": "demo", "tool": "add", "arguments": {"a": 2, "b": 2}},
            timeout=60,
        )
        assert answer.json()["status"] == "succeeded"

        async def over_mcp():
            async with connect(f"{toolgate.base_url}/mcp/demo/", other, "modern") as client:
                return await client.call_tool("add", {"a": 3, "b": 3})

        assert run(over_mcp).structured_content == {"result": 6}
    finally:
        for sock in slow:
            sock.close()


def test_an_sse_stream_its_agent_never_reads_delays_no_other_sessions_news(
    toolgate, agent, settings, monkeypatch
):
    """The tool-list watcher told sessions of a change one after the other, giving each up to
    SEND_TIMEOUT: an agent that stalls its own SSE streams (replies it asks for and never
    reads) held up every other agent's `tools/list_changed` by that much per stream."""
    from approvals.mcp import sessions

    settings.MCP_LIST_CHANGED_INTERVAL = 0.2
    monkeypatch.setattr(sessions, "SEND_TIMEOUT", 600)  # a stalled stream holds on for good
    demo = McpServer.objects.get(name="demo")
    _, other = Agent.create_with_token("other", servers=[demo])
    stalled = _stalled_sse_stream(toolgate, agent.token)
    changed = anyio.Event()

    async def on_message(message):
        if isinstance(message, types.ToolListChangedNotification):
            changed.set()

    async def hear_of_a_change():
        url = f"{toolgate.base_url}/mcp/demo/"
        async with connect(url, other, "legacy", message_handler=on_message) as client:
            await client.list_tools()
            disable = demo.tools.filter(name="add").update
            await in_thread(lambda: disable(approval=ToolApproval.DISABLED))
            with anyio.move_on_after(30):
                await changed.wait()
            return changed.is_set()

    try:
        assert run(hear_of_a_change)
    finally:
        stalled.close()


def _stalled_sse_stream(toolgate, token):
    """An SSE session of `token` that listed its tools, then asked for more replies than the
    connection's buffers hold (each ~1 MB), reading none of them: its stream takes no more."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", toolgate.port))
    sock.sendall(
        f"GET /mcp/demo/sse HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    data = b""
    while not re.search(rb"data: (/\S+session_id=[0-9a-f]{32})", data):
        data += sock.recv(1024)
    url = toolgate.base_url + re.search(rb"data: (/\S+)", data).group(1).decode()
    headers = {"Authorization": f"Bearer {token}"}
    hello = {"protocolVersion": "2025-06-18", "capabilities": {},
             "clientInfo": {"name": "hostile", "version": "1"}}  # fmt: skip
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    messages = [_request("initialize", hello, 0), initialized, _request("tools/list", {})]
    with open("/proc/sys/net/ipv4/tcp_wmem") as wmem:  # the most a socket's send buffer grows to
        replies = int(wmem.read().split()[2]) // 900_000 + 4
    call = {"name": "echo", "arguments": {"text": "x" * 900_000}}
    messages += [_request("tools/call", call, n) for n in range(1, replies + 1)]
    for message in messages:
        assert httpx2.post(url, headers=headers, json=message, timeout=30).status_code == 202
    return sock


def test_made_up_session_ids_leave_nothing_behind(toolgate, agent):
    """2026-07-28 requests ignore `Mcp-Session-Id`; one that carried a made-up id each left a
    session mark in memory until the idle timeout."""
    from approvals.mcp import sessions

    before = len(sessions._by_id)
    raw = Raw(toolgate.base_url, agent.token, "modern")
    for number in range(20):
        raw.headers["Mcp-Session-Id"] = f"made-up-{number}"
        status, message = raw.send("tools/list", {})
        assert status == 200 and "tools" in message["result"]
    assert len(sessions._by_id) == before


def test_another_agent_can_not_end_or_listen_to_a_session(toolgate, agent):
    """A session id that leaked to another agent (or endpoint) neither ends the session
    (DELETE) nor opens its stream of server messages (GET): the same 404 as no session."""
    _, other = Agent.create_with_token("other", servers=McpServer.objects.all())
    owner = Raw(toolgate.base_url, agent.token, "legacy")
    session = {k: v for k, v in owner.headers.items() if k != "Authorization"}
    for token, path in [(other, "/mcp/demo/"), (agent.token, "/mcp/")]:
        stranger = {**session, "Authorization": f"Bearer {token}"}
        url = toolgate.base_url + path
        assert httpx2.delete(url, headers=stranger).status_code == 404
        with httpx2.stream("GET", url, headers=stranger, timeout=10) as stream:
            assert stream.status_code == 404
    status, message = owner.send("tools/list", {})
    assert status == 200 and message["result"]["tools"]


def test_one_agent_can_not_take_every_session(toolgate, agent, settings):
    """Sessions were bounded only for the whole process (the SDK's 10,000): one agent opening
    them within its rate limit filled that, and every other agent's `initialize` got 503."""
    settings.MCP_MAX_SESSIONS_PER_AGENT = 3
    _, other = Agent.create_with_token("other", servers=McpServer.objects.all())
    paths = ["/mcp/demo/", "/mcp/", "/mcp/demo/"]  # an agent's sessions, on any endpoint
    opened = [Raw(toolgate.base_url, agent.token, "legacy", path) for path in paths]
    refused = _initialize(toolgate.base_url + "/mcp/", agent.token)
    assert refused.status_code == 429
    assert refused.json()["error"]["data"]["code"] == "too_many_sessions"
    assert _initialize(toolgate.base_url + "/mcp/demo/", other).status_code == 200
    assert httpx2.delete(opened[0].url, headers=opened[0].headers).status_code == 200
    assert _initialize(toolgate.base_url + "/mcp/demo/", agent.token).status_code == 200
    status, message = opened[1].send("tools/list", {})  # the open ones go on
    assert status == 200 and message["result"]["tools"]


def _initialize(url, token):
    hello = {"protocolVersion": "2025-11-25", "capabilities": {},
             "clientInfo": {"name": "hostile", "version": "1"}}  # fmt: skip
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"}
    return httpx2.post(url, headers=headers, json=_request("initialize", hello), timeout=30)


def test_a_body_cut_short_by_a_disconnect_reaches_no_view():
    """Buffering the body must not turn half a form into a whole one: a client that goes away
    mid-body gets nothing done (Django's own reader raised RequestAborted there)."""
    from config.asgi import BodyLimit

    reached = []

    async def app(scope, receive, send):
        reached.append(await receive())

    async def go():
        messages = [
            {"type": "http.request", "body": b"decision=approve&note=half", "more_body": True},
            {"type": "http.disconnect"},
        ]

        async def receive():
            return messages.pop(0)

        scope = {"type": "http", "path": "/approvals/1/decide", "headers": []}
        await BodyLimit(app)(scope, receive, None)

    anyio.run(go)
    assert reached == []
