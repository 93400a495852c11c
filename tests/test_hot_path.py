"""An auto-approved call of an agent that waits (`POST /api/v1/tool-calls?wait=`, the MCP
endpoint) runs in the web process: what it costs there (issue 11), and that exactly-once holds
on the shorter path. The timings are in bench/README.md ("hot path"); these pin the rows it
writes and the queries it makes."""

from datetime import timedelta

import pytest
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from approvals.models import DecidedBy, Status, ToolCall, request_tool_call
from approvals.rules import PolicyRule
from integrations.models import Agent, ApprovalMode, McpServer

pytestmark = pytest.mark.django_db


def add_demo(running, mode=ApprovalMode.NO_APPROVAL):
    server = McpServer.objects.create(
        name="demo", url=running.url, allow_private_network=True, approval_mode=mode
    )
    assert server.sync_tools().ok
    return server


@pytest.fixture
def statuses():
    """Every status the database ever stored for a call, in order: {call id: [status, …]},
    recorded by a trigger, so whatever wrote it (a request, a worker, the sweeper)."""
    vendor = connection.vendor
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE status_log (id SERIAL, call_id INTEGER, status TEXT)"
                       if vendor == "postgresql" else
                       "CREATE TABLE status_log (id INTEGER PRIMARY KEY, call_id INTEGER, "
                       "status TEXT)")  # fmt: skip
        if vendor == "postgresql":
            cursor.execute(
                "CREATE FUNCTION log_status() RETURNS trigger AS $$ BEGIN "
                "INSERT INTO status_log (call_id, status) VALUES (NEW.id, NEW.status); "
                "RETURN NEW; END $$ LANGUAGE plpgsql"
            )
            for event in ("INSERT", "UPDATE"):
                cursor.execute(
                    f"CREATE TRIGGER log_{event.lower()} AFTER {event} ON approvals_toolcall "
                    "FOR EACH ROW EXECUTE FUNCTION log_status()"
                )
        else:
            log = "INSERT INTO status_log (call_id, status) VALUES (NEW.id, NEW.status);"
            for event in ("INSERT", "UPDATE"):
                cursor.execute(
                    f"CREATE TRIGGER log_{event.lower()} AFTER {event} ON approvals_toolcall "
                    "BEGIN " + log + " END"
                )

    def read():
        with connection.cursor() as cursor:
            cursor.execute("SELECT call_id, status FROM status_log ORDER BY id")
            log = {}
            for call_id, status in cursor.fetchall():
                log.setdefault(call_id, []).append(status)
            return log

    yield read
    with connection.cursor() as cursor:  # a transaction=True test keeps what it made
        for event in ("insert", "update"):
            on = " ON approvals_toolcall" if vendor == "postgresql" else ""
            cursor.execute(f"DROP TRIGGER IF EXISTS log_{event}{on}")
        if vendor == "postgresql":
            cursor.execute("DROP FUNCTION IF EXISTS log_status()")
        cursor.execute("DROP TABLE IF EXISTS status_log")


@pytest.mark.django_db(transaction=True)  # the loop's thread has a connection of its own
def test_a_call_run_here_is_stored_claimed_and_runs_once(loop, upstream, statuses):
    server = add_demo(upstream)
    agent, _ = Agent.create_with_token("bot", [server])
    call, created = request_tool_call(agent, "demo", "echo", {"text": "hi"}, run_here=True)
    assert created and call.claimed_at_insert
    stored = ToolCall.objects.get(pk=call.pk)
    assert (stored.status, stored.decided_by) == (Status.RUNNING, DecidedBy.AUTO)
    assert stored.decided_at == stored.started_at is not None
    assert not stored.claimed_at_insert  # only the request's own object runs it
    # Nobody else can claim it: a worker's message (a redelivery, the sweeper's) and another
    # request's run both find it taken.
    assert not stored.run()
    loop.run(stored.arun())
    assert upstream.recording.count("tools/call") == 0
    loop.run(call.arun())
    loop.run(call.arun())  # the same object once more: nothing
    assert upstream.recording.count("tools/call") == 1
    call.refresh_from_db()
    assert (call.status, call.result_content[0]["text"], call.attempts) == (
        Status.SUCCEEDED, "hi", 1
    )  # fmt: skip
    # It was never `approved`, for anyone to see: no worker or sweeper could have taken it.
    assert statuses()[call.pk] == [Status.RUNNING, Status.SUCCEEDED]


def test_a_call_for_a_worker_is_still_stored_approved(
    upstream, statuses, django_capture_on_commit_callbacks
):
    server = add_demo(upstream)
    agent, _ = Agent.create_with_token("bot", [server])
    with django_capture_on_commit_callbacks() as enqueued:
        call, _ = request_tool_call(agent, "demo", "echo", {"text": "hi"})
    assert (call.status, call.started_at, call.claimed_at_insert) == (Status.APPROVED, None, False)
    assert len(enqueued) == 1
    assert statuses()[call.pk] == [Status.APPROVED]


def test_a_call_to_run_here_whose_web_process_died_becomes_unknown_not_rerun(upstream, settings):
    """Stored `running`, then the process is gone before (or while) it runs: the sweeper
    does not hand it to a worker (it may have reached the server) but to a human."""
    server = add_demo(upstream)
    agent, _ = Agent.create_with_token("bot", [server])
    call, _ = request_tool_call(agent, "demo", "echo", {"text": "hi"}, run_here=True)
    long_ago = timezone.now() - timedelta(
        seconds=max(settings.TOOL_CALL_LOST_AFTER, settings.TOOL_CALL_REQUEUE_AFTER) + 1
    )
    ToolCall.objects.filter(pk=call.pk).update(decided_at=long_ago, started_at=long_ago)
    assert ToolCall.sweep() == {"expired": 0, "requeued": 0, "unknown": 1}
    call.refresh_from_db()
    assert (call.status, call.error_code) == (Status.UNKNOWN, "worker_lost")
    assert upstream.recording.count("tools/call") == 0


def test_a_call_needing_a_human_is_pending_even_when_the_agent_waits(upstream):
    server = add_demo(upstream, mode=ApprovalMode.ALWAYS_ASK)
    agent, _ = Agent.create_with_token("bot", [server])
    call, _ = request_tool_call(agent, "demo", "echo", {"text": "hi"}, run_here=True)
    assert (call.status, call.started_at, call.claimed_at_insert) == (
        Status.PENDING_APPROVAL, None, False
    )  # fmt: skip


def waited_call(client, token, server="demo", tool="echo"):
    body = {"server": server, "tool": tool, "arguments": {"text": "hi"}}
    return client.post(
        "/api/v1/tool-calls?wait=10", body, content_type="application/json",
        headers={"Authorization": f"Bearer {token}"},
    )  # fmt: skip


def test_an_auto_approved_waited_call_makes_five_queries(
    client, upstream, django_assert_num_queries
):
    """The agent; the tool with its server (through the agent's servers) and whether the
    server has rules; the insert, as `running` (in a transaction: BEGIN, INSERT); the result.
    No claim, no second read of the agent's servers, no rules query for a server without."""
    server = add_demo(upstream)
    _, token = Agent.create_with_token("bot", [server])
    waited_call(client, token)  # warm: the agent's last use is written once a minute
    with django_assert_num_queries(4) as queries:
        answer = waited_call(client, token).json()
    assert (answer["status"], answer["result"]["content"][0]["text"]) == ("succeeded", "hi")
    writes = [q["sql"].split(" ", 1)[0] for q in queries.captured_queries[2:]]
    assert writes == ["INSERT", "UPDATE"]


def test_a_server_with_rules_costs_one_query_more_and_its_rules_apply(
    client, upstream, django_assert_num_queries
):
    server = add_demo(upstream)
    _, token = Agent.create_with_token("bot", [server])
    waited_call(client, token)
    PolicyRule.objects.create(server=server, condition='args.text == "hi"', action="deny")
    with django_assert_num_queries(4):  # the agent, the tool, the rules, the refusal's row
        answer = waited_call(client, token).json()
    assert answer["error"]["code"] == "rule_denied"


def test_a_server_the_agent_may_not_use_costs_the_queries_of_one_that_does_not_exist(client):
    mine = McpServer.objects.create(name="mine", url="https://mcp.example.com/mcp")
    _, token = Agent.create_with_token("bot", [mine])
    waited_call(client, token, server="other")  # warm: the agent's last use
    with CaptureQueriesContext(connection) as missing:
        before = waited_call(client, token, server="other")
    McpServer.objects.create(name="other", url="https://mcp.example.com/mcp")
    with CaptureQueriesContext(connection) as not_mine:
        after = waited_call(client, token, server="other")
    assert (after.status_code, after.content) == (before.status_code, before.content)
    assert before.json()["error"]["code"] == "unknown_server"
    assert len(not_mine.captured_queries) == len(missing.captured_queries)


def asgi_post(token, server="demo"):
    """POST a waited call to the ASGI application, in this process (await it in `loop`)."""
    import httpx2

    from config.asgi import application

    async def post():
        transport = httpx2.ASGITransport(app=application)
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx2.AsyncClient(
            transport=transport, base_url="http://127.0.0.1", headers=headers
        ) as http:
            body = {"server": server, "tool": "echo", "arguments": {"text": "hi"}}
            return await http.post("/api/v1/tool-calls", params={"wait": 10}, json=body)

    return post()


@pytest.mark.django_db(transaction=True)
def test_the_database_threads_connection_is_still_checked_at_each_api_request(
    loop, upstream, monkeypatch
):
    """Django's request_started, sent in the API's first hop, still closes the database
    thread's connection once it is past CONN_MAX_AGE (or broken), for a new one; with
    PostgreSQL's pool (CONN_MAX_AGE 0) it hands it back to the pool at each request."""
    from asgiref.sync import sync_to_async

    server = add_demo(upstream)
    _, token = Agent.create_with_token("bot", [server])
    assert loop.run(asgi_post(token)).status_code == 201

    async def database_threads():
        return await sync_to_async(lambda: connections["default"])()

    theirs = loop.run(database_threads())
    assert theirs is not connections["default"] and theirs.connection is not None
    if theirs.settings_dict["OPTIONS"].get("pool"):
        closed = []
        close = theirs.close
        monkeypatch.setattr(theirs, "close", lambda: closed.append(1) or close())
        assert loop.run(asgi_post(token, server="nope")).status_code == 404
        assert closed  # back to the pool at the request's start
        return
    before = theirs.connection
    loop.run(asgi_post(token, server="nope"))  # in CONN_MAX_AGE: kept
    assert theirs.connection is before
    theirs.close_at = 0  # as if CONN_MAX_AGE had passed
    assert loop.run(asgi_post(token, server="nope")).status_code == 404
    assert theirs.connection is not None and theirs.connection is not before


@pytest.mark.django_db(transaction=True)  # the web process's database thread has its own
def test_an_auto_approved_waited_call_makes_four_hops_to_threads(loop, upstream, monkeypatch):
    """Each hop from the event loop to a thread is a GIL hand-over and a wake-up of the loop
    (issue 11): Django's request_started with the agent, its rate limit and the request's
    lookup; the decision (on a validation thread); the insert; the result. Django's
    request_finished goes out in the loop (config/asgi.py)."""
    import asyncio

    server = add_demo(upstream)
    _, token = Agent.create_with_token("bot", [server])
    hops = []
    run_in_executor = asyncio.BaseEventLoop.run_in_executor

    def counted(self, executor, func, *args):
        hops.append(func)
        return run_in_executor(self, executor, func, *args)

    loop.run(asgi_post(token))  # warm: the agent's last use, the upstream session
    monkeypatch.setattr(asyncio.BaseEventLoop, "run_in_executor", counted)
    answer = loop.run(asgi_post(token)).json()
    assert answer["status"] == "succeeded"
    assert len(hops) == 4


def test_a_large_body_is_parsed_in_the_loop_with_the_same_answers(client, upstream):
    """Over PARSE_IN_HOP_BYTES, the body is parsed outside the database thread (its cost is
    the agent's to choose) and looked up in a hop of its own: the answers are the same."""
    from approvals.api import PARSE_IN_HOP_BYTES

    server = add_demo(upstream)
    _, token = Agent.create_with_token("bot", [server])
    text = "x" * (PARSE_IN_HOP_BYTES + 1)
    body = {"server": "demo", "tool": "echo", "arguments": {"text": text}}
    headers = {"Authorization": f"Bearer {token}"}
    answer = client.post(
        "/api/v1/tool-calls?wait=10", body, content_type="application/json", headers=headers
    ).json()
    assert (answer["status"], answer["result"]["content"][0]["text"]) == ("succeeded", text)
    for raw, message in (
        ("[" + "1, " * 5000 + "1]", "The body must be a JSON object."),
        ('{"server": "demo", "tool": "echo", "x": "' + text + '"}', "Unknown field(s): x."),
    ):
        refused = client.post(
            "/api/v1/tool-calls?wait=10", raw, content_type="application/json", headers=headers
        )
        assert (refused.status_code, refused.json()["error"]["message"]) == (400, message)
    missing = {**body, "server": "nope"}
    refused = client.post(
        "/api/v1/tool-calls?wait=10", missing, content_type="application/json", headers=headers
    )
    assert (refused.status_code, refused.json()["error"]["code"]) == (404, "unknown_server")
