"""The MCP endpoint on the wire, as the spec words it for each protocol version: plain HTTP
requests, so what is checked is what any client sees, whatever its SDK."""

import json

import httpx2
import pytest

from approvals.models import Status, ToolCall
from integrations.models import Agent
from tests.mcp_live import add_server, approve_when_pending
from tests.mcp_servers import demo_server

pytestmark = pytest.mark.django_db(transaction=True)
HANDSHAKES = ["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"]
ACCEPT = "application/json, text/event-stream"


@pytest.fixture
def demo(mcp_factory):
    return add_server("demo", mcp_factory(demo_server()).url)


@pytest.fixture
def token(demo):
    return Agent.create_with_token("wire-bot", servers=[demo])[1]


class Session:
    """One handshake-era session, opened with `initialize` at `version`; later requests carry
    the `MCP-Protocol-Version` header only from 2025-06-18 on, as clients of each version do."""

    def __init__(self, url, token, version):
        self.url, self.token, self.version = url, token, version
        self.session_id = None
        self.opened = self.post(_request(0, "initialize", {
            "protocolVersion": version, "capabilities": {},
            "clientInfo": {"name": "wire", "version": "1"}}))  # fmt: skip
        self.session_id = self.opened.headers.get("mcp-session-id")
        self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def headers(self, **extra):
        headers = {"Authorization": f"Bearer {self.token}", "Accept": ACCEPT,
                   "Content-Type": "application/json", **extra}  # fmt: skip
        if self.session_id:
            headers["Mcp-Session-Id"] = self.session_id
            if self.version >= "2025-06-18":
                headers["MCP-Protocol-Version"] = self.version
        return headers

    def post(self, body, **extra):
        raw = body if isinstance(body, str) else json.dumps(body)
        return httpx2.post(self.url, headers=self.headers(**extra), content=raw, timeout=30)

    def call(self, request_id, method, params=None):
        """The one JSON-RPC answer to a request."""
        response = self.post(_request(request_id, method, params))
        (answer,) = messages(response)
        return answer


def _request(request_id, method, params=None):
    request = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not None:
        request["params"] = params
    return request


def messages(response):
    """The JSON-RPC messages of a response, whether plain JSON or an SSE stream."""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        return [json.loads(line[5:]) for line in response.text.splitlines()
                if line.startswith("data:") and line[5:].strip()]  # fmt: skip
    return [response.json()] if response.content else []


@pytest.fixture(params=HANDSHAKES)
def session(request, toolgate, token):
    return Session(f"{toolgate.base_url}/mcp/demo/", token, request.param)


def test_initialize_answers_the_version_asked_for_with_a_session(session):
    (answer,) = messages(session.opened)
    assert answer["result"]["protocolVersion"] == session.version
    assert answer["result"]["serverInfo"]["name"] == "toolgate"
    assert answer["result"]["capabilities"]["tools"] == {"listChanged": True}
    assert session.session_id


def test_ping_list_and_call(session):
    assert session.call(1, "ping") == {"jsonrpc": "2.0", "id": 1, "result": {}}
    tools = session.call(2, "tools/list")["result"]["tools"]
    assert "echo" in {tool["name"] for tool in tools}
    called = session.call(3, "tools/call", {"name": "echo", "arguments": {"text": "hi"}})
    assert called["result"]["content"] == [{"type": "text", "text": "hi"}]
    assert called["result"]["isError"] is False


def test_an_unknown_method_is_method_not_found(session):
    answer = session.call(7, "nothing/here")
    assert answer["id"] == 7 and answer["error"]["code"] == -32601


def test_an_unknown_tool_is_invalid_params(session):
    answer = session.call(8, "tools/call", {"name": "nope", "arguments": {}})
    assert answer["error"] == {"code": -32602, "message": "Unknown tool: nope"}


@pytest.mark.parametrize(
    ("body", "code"),
    [("{not json", -32700), ('{"jsonrpc": "2.0", "id": 6}', -32600), ('"a string"', -32600)],
)
def test_a_body_that_is_no_json_rpc_message_is_a_json_rpc_error(session, body, code):
    response = session.post(body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == code


def test_a_batch_is_answered_in_2025_03_26_and_refused_after(session):
    batch = [_request(4, "ping"), {"jsonrpc": "2.0", "method": "notifications/cancelled",
             "params": {"requestId": 99}}, _request(5, "tools/list")]  # fmt: skip
    response = session.post(batch)
    if session.version in ("2025-03-26", "2024-11-05"):
        assert response.status_code == 200
        first, second = response.json()
        assert first == {"jsonrpc": "2.0", "id": 4, "result": {}}
        assert second["id"] == 5 and "echo" in {t["name"] for t in second["result"]["tools"]}
    else:
        assert response.status_code == 400
        assert response.json()["error"]["code"] == -32600
        assert "no JSON-RPC batches" in response.json()["error"]["message"]


@pytest.mark.parametrize("version", ["2025-03-26", "2024-11-05"])
def test_a_batch_of_notifications_only_is_accepted(toolgate, token, version):
    session = Session(f"{toolgate.base_url}/mcp/demo/", token, version)
    response = session.post([{"jsonrpc": "2.0", "method": "notifications/initialized"}])
    assert response.status_code == 202 and not response.content


def test_a_batch_may_not_hold_initialize_nor_be_empty(toolgate, token):
    session = Session(f"{toolgate.base_url}/mcp/demo/", token, "2025-03-26")
    for batch in ([], [_request(1, "initialize", {})]):
        response = session.post(batch)
        assert response.status_code == 400 and response.json()["error"]["code"] == -32600


def test_a_batch_is_bounded_and_its_ids_checked(toolgate, token):
    """A batch runs its messages at once as one request of the rate limit: at most 32; and a
    message in it with an unusable id is refused like one sent alone."""
    from approvals.mcp.app import MAX_BATCH

    session = Session(f"{toolgate.base_url}/mcp/demo/", token, "2025-03-26")
    too_many = [_request(n, "ping") for n in range(MAX_BATCH + 1)]
    bad_id = [_request(1, "ping"), {"jsonrpc": "2.0", "id": 1.5, "method": "ping"}]
    for batch in (too_many, bad_id):
        response = session.post(batch)
        assert response.status_code == 400 and response.json()["error"]["code"] == -32600
    response = session.post([_request(n, "ping") for n in range(MAX_BATCH)])
    assert response.status_code == 200 and len(response.json()) == MAX_BATCH


def test_a_batch_whose_requests_share_an_id_is_refused_and_runs_nothing(toolgate, token):
    """Its requests ran at once on the session, each taking the other's place: both calls
    reached the server and the batch was never answered."""
    session = Session(f"{toolgate.base_url}/mcp/demo/", token, "2025-03-26")
    add = {"name": "add", "arguments": {"a": 1, "b": 2}}
    for first, second in [(1, 1), ("a", "a"), (1, "1")]:
        batch = [_request(first, "tools/call", add), _request(second, "tools/call", add)]
        response = session.post(batch)
        assert response.status_code == 400 and response.json()["error"]["code"] == -32600
        assert "distinct ids" in response.json()["error"]["message"]
    assert not ToolCall.objects.exists()
    response = session.post([_request(1, "tools/call", add), _request(2, "ping")])
    assert [answer["id"] for answer in response.json()] == [1, 2]


def test_get_opens_the_sessions_stream_and_delete_ends_the_session(session):
    headers = session.headers(Accept="text/event-stream")
    with httpx2.stream("GET", session.url, headers=headers, timeout=10) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
    deleted = httpx2.delete(session.url, headers=session.headers(), timeout=10)
    assert deleted.status_code == 200
    after = session.post(_request(9, "ping"))
    assert after.status_code == 404  # the client must start a new session


def test_requests_without_the_session_id_are_refused(toolgate, token):
    url = f"{toolgate.base_url}/mcp/demo/"
    headers = {"Authorization": f"Bearer {token}", "Accept": ACCEPT,
               "Content-Type": "application/json"}  # fmt: skip
    response = httpx2.post(url, headers=headers, content=json.dumps(_request(1, "ping")))
    assert response.status_code == 400
    for method in ("GET", "DELETE"):
        assert httpx2.request(method, url, headers=headers).status_code == 400


def test_a_bad_token_is_401_with_a_bearer_challenge(toolgate, token):
    response = httpx2.post(
        f"{toolgate.base_url}/mcp/demo/", content=json.dumps(_request(1, "ping")),
        headers={"Authorization": "Bearer tg_wrong", "Accept": ACCEPT,
                 "Content-Type": "application/json"},
    )  # fmt: skip
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith('Bearer realm="toolgate"')


@pytest.mark.parametrize(
    ("origin", "status"),
    [("http://evil.example", 403), ("null", 403), ("http://127.0.0.1:1", 200)],
)
def test_the_origin_is_validated(toolgate, token, settings, origin, status):
    settings.MCP_ALLOWED_ORIGINS = ["http://127.0.0.1:*"]
    session = Session(f"{toolgate.base_url}/mcp/demo/", token, "2025-06-18")
    assert session.post(_request(1, "ping"), Origin=origin).status_code == status


def _held_call_dropped(session, request_id, text):
    """POST a call that waits for a human, read up to its first progress notification, and
    drop the connection: the ids of the events seen."""
    params = {"name": "echo", "arguments": {"text": text}, "_meta": {"progressToken": 1}}
    body = json.dumps(_request(request_id, "tools/call", params))
    seen = []
    with httpx2.stream("POST", session.url, headers=session.headers(), content=body,
                       timeout=30) as stream:  # fmt: skip
        for line in stream.iter_lines():
            if line.startswith("id:"):
                seen.append(line[3:].strip())
            if line.startswith("data:") and "notifications/progress" in line:
                return seen
    raise AssertionError("the held call's stream ended before its progress notification")


def _resumed(session, last_event_id, until, timeout=20):
    """The JSON-RPC messages a GET with `Last-Event-ID` brings, up to one containing `until`."""
    headers = session.headers(Accept="text/event-stream", **{"Last-Event-ID": last_event_id})
    found = []
    with httpx2.stream("GET", session.url, headers=headers, timeout=timeout) as stream:
        assert stream.status_code == 200
        for line in stream.iter_lines():
            if line.startswith("data:") and line[5:].strip():
                found.append(json.loads(line[5:]))
                if until in line:
                    return found
    raise AssertionError(f"the resumed stream ended without {until!r}: {found}")


@pytest.fixture
def ask(demo):
    demo.approval_mode = "always_ask"
    demo.save()


def test_a_client_that_lost_a_held_calls_stream_resumes_it_and_gets_the_answer(
    toolgate, token, ask
):
    session = Session(f"{toolgate.base_url}/mcp/demo/", token, "2025-11-25")
    seen = _held_call_dropped(session, 3, "resume me")
    assert ToolCall.objects.get().status == Status.PENDING_APPROVAL  # a lost stream: no cancel
    approve_when_pending("deny", "not now")
    answer = _resumed(session, seen[-1], "Denied")[-1]
    assert answer["id"] == 3
    assert answer["result"]["content"][0]["text"].startswith(
        "Denied by alice: not now. The tool was not run. Why it needed a human:"
    )


def test_a_resumed_stream_replays_only_its_own_sessions_events(toolgate, token, ask):
    url = f"{toolgate.base_url}/mcp/demo/"
    mine, theirs = Session(url, token, "2025-11-25"), Session(url, token, "2025-11-25")
    seen = _held_call_dropped(mine, 3, "mine")
    assert "tools" in theirs.call(3, "tools/list")["result"]  # the same request id, elsewhere
    approve_when_pending("deny", "")
    replayed = _resumed(mine, seen[0], "Denied")
    assert not any("tools" in message.get("result", {}) for message in replayed)
    with pytest.raises((AssertionError, httpx2.ReadTimeout)):  # nor can another session
        _resumed(theirs, seen[0], "Denied", timeout=2)
