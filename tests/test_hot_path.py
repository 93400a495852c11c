"""An auto-approved call of an agent that waits (`POST /api/v1/tool-calls?wait=`, the MCP
endpoint) runs in the web process: what it costs there (issue 11), and that exactly-once holds
on the shorter path. The timings are in bench/README.md ("hot path"); these pin the rows it
writes and the queries it makes."""

import json
import threading
from datetime import timedelta

import pytest
from django.core.serializers.json import DjangoJSONEncoder
from django.db import OperationalError, connection, connections
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


def asgi_post(token, server="demo", text="hi", app=None):
    """POST a waited call to the ASGI application (or `app`), in this process (await it in
    `loop`)."""
    import httpx2

    from config.asgi import application

    async def post():
        transport = httpx2.ASGITransport(app=app or application)
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx2.AsyncClient(
            transport=transport, base_url="http://127.0.0.1", headers=headers
        ) as http:
            body = {"server": server, "tool": "echo", "arguments": {"text": text}}
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
@pytest.mark.usefixtures("roomy_budget")
def test_an_auto_approved_waited_call_makes_two_hops_to_threads(loop, upstream, monkeypatch):
    """Each hop from the event loop to a thread is a GIL hand-over and a wake-up of the loop
    (issue 11): Django's request_started with the agent, its rate limit, the request's
    lookup, its decision (provably cheap here: `_Request.decide_here`) and the insert; the
    result. Django's request_finished goes out in the loop (config/asgi.py)."""
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
    assert len(hops) == 2


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


# The hot path's statements, their SQL built once per connection (integrations/statements.py) --


def columns(obj):
    """Every column of an instance, as the program reads it (secrets decrypted, JSON decoded,
    datetimes as datetimes), with its state."""
    values = {f.attname: getattr(obj, f.attname) for f in obj._meta.concrete_fields}
    return values, (obj._state.db, obj._state.adding)


# The statements' tests run in the suite's PostgreSQL pass too (`make test`), where the
# statements also run prepared on the server (`statements._cursor`).
ON_POSTGRESQL_TOO = pytest.mark.integration
# Prepared statements are PostgreSQL's: these run in that pass only (ON_POSTGRESQL_TOO too).
ONLY_ON_POSTGRESQL = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="PostgreSQL's prepared statements: the PG pass"
)


class Given:
    """The `filters` of a statement's builder, giving real values instead of sentinels: the
    very queryset the statement runs, for the ORM to run."""

    def __init__(self, **values):
        self.values = values

    def sentinel(self, name, many=0):
        return self.values[name]


def secret_server(name="demo", **fields):
    return McpServer.objects.create(
        name=name, url="https://mcp.example.com/mcp?key=s3cret", secret_token="tok-1",
        headers={"X-Key": "h-1"}, server_info={"transport": "streamable_http"}, **fields,
    )  # fmt: skip


def add_tool(server, name="echo"):
    from integrations.models import Tool

    definition = {"name": name, "inputSchema": {"type": "object"}}
    return Tool.objects.create_from_definition(server, definition, timezone.now())


@ON_POSTGRESQL_TOO
def test_the_tool_lookup_gives_the_instances_the_orm_gives(django_assert_num_queries):
    from approvals import policy
    from integrations.oauth import OAuthCredential

    plain, with_oauth = secret_server(), secret_server("other", auth_kind="oauth")
    OAuthCredential.objects.create(
        server=with_oauth, client_secret="cs-1", client_registration={"client_secret": "cs-1"},
        access_token="at-1", refresh_token="rt-1", expires_at=timezone.now(),
    )  # fmt: skip
    for server in (plain, with_oauth):
        add_tool(server)
    agent, _ = Agent.create_with_token("bot", [plain, with_oauth])
    PolicyRule.objects.create(server=with_oauth, condition="true", action="ask")
    for server in ("demo", "other", "nope"):
        values = {"agent": agent.pk, "server": server, "tool": "echo", "now": timezone.now()}
        orm = list(policy._tool_of_agent(Given(**values)))
        with django_assert_num_queries(1):
            fast = policy._TOOL_OF_AGENT.rows(**values)
        assert len(fast) == len(orm) == (server != "nope")
        for mine, theirs in zip(fast, orm, strict=True):
            assert columns(mine) == columns(theirs)
            assert columns(mine.server) == columns(theirs.server)
            assert mine.server.secret_token == "tok-1" and mine.server.headers == {"X-Key": "h-1"}
            assert mine.server_has_rules == theirs.server_has_rules == (server == "other")
            with django_assert_num_queries(0):  # select_related, as the ORM's
                if server == "other":
                    assert columns(mine.server.oauth) == columns(theirs.server.oauth)
                    assert mine.server.oauth.access_token == "at-1"
                else:  # known to have none, as the ORM knows
                    with pytest.raises(OAuthCredential.DoesNotExist):
                        mine.server.oauth  # noqa: B018
                    assert mine.server.reconnect_reason == theirs.server.reconnect_reason == ""


@ON_POSTGRESQL_TOO
def test_the_tool_lookup_is_the_orms_sql():
    from approvals import policy

    server = secret_server()
    add_tool(server)
    agent, _ = Agent.create_with_token("bot", [server])
    values = {"agent": agent.pk, "server": "demo", "tool": "echo", "now": timezone.now()}
    policy._TOOL_OF_AGENT.rows(**values)
    wrapper = connections["default"]  # this thread's (`connection` is a proxy)
    compiled = policy._TOOL_OF_AGENT._compiled.for_connection(wrapper, None)
    orm = policy._tool_of_agent(Given(**values)).query.get_compiler(connection=wrapper)
    sql, params = orm.as_sql()
    assert compiled.sql == sql
    filled = list(compiled.params)
    compiled.filters.fill(filled, compiled.slots, values, wrapper)
    assert filled == list(params)


@ON_POSTGRESQL_TOO
def test_an_expired_rule_and_an_admins_change_are_read_at_once():
    """Nothing but SQL text is kept: each lookup reads the rows as they are now."""
    from approvals import policy
    from approvals.models import Refused

    server = add_demo_rows()
    agent, _ = Agent.create_with_token("bot", [server])
    rule = PolicyRule.objects.create(server=server, condition="true", action="deny")
    assert policy.find_tool(agent, "demo", "echo")[1].server_has_rules
    PolicyRule.objects.filter(pk=rule.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert not policy.find_tool(agent, "demo", "echo")[1].server_has_rules
    McpServer.objects.filter(pk=server.pk).update(enabled=False)
    with pytest.raises(Refused) as refused:
        request_tool_call(agent, "demo", "echo", {"text": "hi"})
    assert refused.value.code == "server_disabled"
    agent.servers.clear()
    with pytest.raises(Refused) as refused:
        request_tool_call(agent, "demo", "echo", {"text": "hi"})
    assert refused.value.code == "unknown_server"


def add_demo_rows():
    server = secret_server(approval_mode=ApprovalMode.NO_APPROVAL)
    add_tool(server)  # reviewed: what a server offers before its first sync is the baseline
    return server


@ON_POSTGRESQL_TOO
def test_the_agents_lookup_gives_the_instance_the_orm_gives():
    from integrations.models import _AGENT_BY_TOKEN, hash_token

    agent, token = Agent.create_with_token("bot")
    Agent.objects.filter(pk=agent.pk).update(last_used_at=timezone.now())
    digest = hash_token(token)
    [mine] = _AGENT_BY_TOKEN.rows(digest=digest)
    theirs = Agent.objects.filter(token_hash=digest, is_active=True).first()
    assert columns(mine) == columns(theirs)
    assert Agent.authenticate(token).pk == agent.pk
    Agent.objects.filter(pk=agent.pk).update(is_active=False)
    assert _AGENT_BY_TOKEN.rows(digest=digest) == [] and Agent.authenticate(token) is None


def stored_columns(call):
    """A stored call's columns as the ORM reads them back, and as the database holds them."""
    values, _ = columns(ToolCall.objects.get(pk=call.pk))
    del values["id"]
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT arguments, warnings FROM approvals_toolcall WHERE id = %s", [call.pk]
        )
        raw = cursor.fetchone()
    return values, raw


@ON_POSTGRESQL_TOO
def test_a_call_is_inserted_as_the_orm_inserts_it(django_assert_num_queries):
    from django.db.models import Model
    from django.db.models.signals import post_save, pre_save

    server = add_demo_rows()
    agent, _ = Agent.create_with_token("bot", [server])
    tool = server.tools.get()
    now = timezone.now()

    def new_call():
        return ToolCall(
            agent=agent, server=server, tool=tool, server_name="demo", tool_name="echo",
            tool_fingerprint=tool.fingerprint, arguments={"text": "hé", "n": [1, 2]},
            status=Status.RUNNING, decided_by=DecidedBy.AUTO, decided_at=now, started_at=now,
            requested_at=now, reasons=[{"code": "no_approval", "message": "…"}],
        )  # fmt: skip

    signals = []

    def record(sender, instance, **kwargs):
        signals.append((kwargs.get("created"), instance.pk, kwargs["using"], kwargs["raw"]))

    pre_save.connect(record, sender=ToolCall)
    post_save.connect(record, sender=ToolCall)
    try:
        mine, theirs = new_call(), new_call()
        with django_assert_num_queries(1):
            mine.save()
        ToolCall.save_base(theirs)  # the ORM's own INSERT (ToolCall.save fills the digest)
        theirs.arguments_size, theirs.arguments_digest = mine.arguments_size, mine.arguments_digest
        Model.save(theirs, force_update=True)
    finally:
        pre_save.disconnect(record, sender=ToolCall)
        post_save.disconnect(record, sender=ToolCall)
    assert signals[:2] == [(None, None, "default", False), (True, mine.pk, "default", False)]
    assert mine.pk and not mine._state.adding and mine._state.db == "default"
    assert columns(mine)[1] == columns(theirs)[1]
    (mine_values, mine_raw), (their_values, their_raw) = (
        stored_columns(mine),
        stored_columns(theirs),
    )
    assert mine_values == their_values
    assert mine_values["arguments"] == {"text": "hé", "n": [1, 2]}
    for raw in (*mine_raw, *their_raw):  # encrypted at rest, each encryption its own
        assert raw.startswith("gAAAAA") and "text" not in raw
    assert mine_raw[0] != their_raw[0]


@ON_POSTGRESQL_TOO
def test_a_transition_updates_as_the_orm_updates(django_user_model):
    """`_transition`'s UPDATE (statements.update) writes what the ORM's update() writes, and
    only where the row is still in the source status (and matches `where`)."""
    server = add_demo_rows()
    agent, _ = Agent.create_with_token("bot", [server])
    user = django_user_model.objects.create(username="alice")
    now = timezone.now()

    def pending():
        call = ToolCall(
            agent=agent, server=server, server_name="demo", tool_name="echo",
            arguments={"a": 1}, status=Status.PENDING_APPROVAL,
            requested_at=now, expires_at=now + timedelta(hours=1),
        )  # fmt: skip
        call.save()
        return call

    mine, theirs = pending(), pending()
    fields = {
        "decided_by": DecidedBy.HUMAN, "decided_by_user": user, "decided_at": now,
        "note": "ok", "arguments": {"a": 2}, "requested_arguments": {"a": 1},
        "reasons": [{"code": "x", "message": "y"}], "result_content": None,
    }  # fmt: skip
    assert mine._transition(
        [Status.PENDING_APPROVAL], Status.APPROVED, where={"expires_at__gt": now}, **fields
    )
    ToolCall.objects.filter(pk=theirs.pk, status__in=[Status.PENDING_APPROVAL]).update(
        status=Status.APPROVED, **fields
    )
    assert stored_columns(mine)[0] == stored_columns(theirs)[0]
    assert mine.status == Status.APPROVED and mine.decided_by_user == user
    # The row moved on: a second transition from the same source changes nothing.
    assert not mine._transition([Status.PENDING_APPROVAL], Status.DENIED)
    assert ToolCall.objects.get(pk=mine.pk).status == Status.APPROVED
    late = pending()
    assert not late._transition(
        [Status.PENDING_APPROVAL],
        Status.APPROVED,
        where={"expires_at__gt": now + timedelta(days=1)},
    )
    assert ToolCall.objects.get(pk=late.pk).status == Status.PENDING_APPROVAL


def test_a_waited_call_compiles_no_sql_once_warm(client, upstream, monkeypatch):
    """The four statements of an auto-approved waited call are compiled at their first run on a
    connection, and only their values are prepared after that."""
    from django.db.models.sql.compiler import SQLCompiler

    server = add_demo(upstream)
    _, token = Agent.create_with_token("bot", [server])
    waited_call(client, token)
    compiled = []

    def counting(as_sql):
        def counted(self, *args, **kwargs):
            compiled.append(type(self).__name__)
            return as_sql(self, *args, **kwargs)

        return counted

    compilers, found = [SQLCompiler], 0
    while found < len(compilers):  # every compiler class, the backends' own among them
        compilers += compilers[found].__subclasses__()
        found += 1
    for compiler in compilers:
        if "as_sql" in vars(compiler):
            monkeypatch.setattr(compiler, "as_sql", counting(vars(compiler)["as_sql"]))
    assert waited_call(client, token).json()["status"] == "succeeded"
    assert compiled == []


def test_a_statement_it_cannot_build_fails_loudly_not_quietly():
    from django.core.exceptions import EmptyResultSet
    from django.db.models import F

    from integrations import statements

    active = statements.Query(
        lambda filters: Agent.objects.filter(is_active=filters.sentinel("active")),
        active=Agent._meta.get_field("is_active"),
    )
    with pytest.raises(TypeError, match="No sentinel"):
        active.rows(active=True)  # a boolean has no value to spare for a sentinel
    folded = statements.Query(
        lambda filters: Agent.objects.filter(pk__in=[]).filter(name=filters.sentinel("name")),
        name=Agent._meta.get_field("name"),
    )
    with pytest.raises(EmptyResultSet):  # the ORM's own: no SQL to keep
        folded.rows(name="bot")
    agent, _ = Agent.create_with_token("bot")
    with pytest.raises(TypeError, match="expressions go through the ORM"):
        statements.update(Agent, {"pk": agent.pk}, name=F("description"))
    with pytest.raises(ValueError, match="own columns"):
        statements.update(Agent, {"servers__name": "x"}, name="y")
    assert statements.update(Agent, {"pk__in": []}, name="y") == 0
    assert Agent.objects.get(pk=agent.pk).name == "bot"


@ON_POSTGRESQL_TOO
def test_the_reattach_lookup_gives_the_instances_the_orm_gives():
    from approvals.models import _TWIN_CANDIDATES, _digest, _twin_candidates
    from integrations import limits

    server = add_demo_rows()
    agent, _ = Agent.create_with_token("bot", [server])
    now = timezone.now()
    arguments = {"text": "hi"}
    for status, finished, handed_back in (
        (Status.PENDING_APPROVAL, None, None),
        (Status.SUCCEEDED, now, now),
        (Status.SUCCEEDED, now, None),  # finished, never handed back: no twin
        (Status.SUCCEEDED, now - timedelta(days=1), now),  # out of the window
    ):
        ToolCall(
            agent=agent, server=server, server_name="demo", tool_name="echo",
            arguments=arguments, status=status, expires_at=now + timedelta(hours=1),
            finished_at=finished, handed_back_at=handed_back,
        ).save()  # fmt: skip
    digest = _digest("demo", "echo", limits.canonical_json(arguments).encode())
    values = {"agent": agent.pk, "digest": digest, "since": now - timedelta(minutes=5)}
    mine = sorted(_TWIN_CANDIDATES.rows(**values), key=lambda call: call.pk)
    theirs = sorted(_twin_candidates(Given(**values)), key=lambda call: call.pk)
    assert len(mine) == 2
    for a, b in zip(mine, theirs, strict=True):
        assert (a.pk, a.finished_at, a.handed_back_at) == (b.pk, b.finished_at, b.handed_back_at)
        assert a.get_deferred_fields() == b.get_deferred_fields() != set()
    assert ToolCall.twin_to_reattach(agent, "demo", "echo", arguments).pk == mine[-1].pk


def test_the_web_process_keeps_its_start_up_objects_out_of_full_collections():
    """config/asgi.py freezes what start-up made: the cyclic collector's full collections
    then walk only what requests made since, not ~130,000 long-lived objects (issue 11)."""
    import gc

    import config.asgi  # noqa: F401 - what uvicorn imports

    assert gc.get_freeze_count() > 50_000


def test_the_web_process_hands_the_gil_over_within_a_millisecond():
    """config/asgi.py sets the interpreter's switch interval to 1 ms (Python's default: 5 ms):
    the loop and the database thread hand each call over twice, and under load each hand-over
    waited up to the interval for the other to let go of the GIL (issue 11)."""
    import sys

    import config.asgi

    assert sys.getswitchinterval() == pytest.approx(config.asgi.SWITCH_INTERVAL) == 0.001


PROBE = "the result to look for"


@pytest.fixture
def reply_first(settings):
    settings.REPLY_BEFORE_RECORD = True


def _recorded_in_order(monkeypatch, application, hold=True):
    """(an ASGI app that notes when the result went out, the list of what happened):
    "replied" when a body holding the result (PROBE) was sent, "recorded" when a run's result was
    written (`ToolCall._transition` to `succeeded`), in the order they happened. With `hold`,
    the record waits until the result was sent (for at most 5 s): a reply that waited for the
    record would come after it."""
    happened, sent = [], threading.Event()
    transition = ToolCall._transition

    def noted(call, sources, target, *args, **fields):
        if target == Status.SUCCEEDED and hold:
            sent.wait(5)
        changed = transition(call, sources, target, *args, **fields)
        if target == Status.SUCCEEDED:
            happened.append("recorded")
        return changed

    monkeypatch.setattr(ToolCall, "_transition", noted)

    async def app(scope, receive, send):
        async def noting(message):
            await send(message)
            if message["type"] == "http.response.body" and PROBE.encode() in message["body"]:
                happened.append("replied")
                sent.set()

        await application(scope, receive, noting)

    return app, happened


@pytest.mark.django_db(transaction=True)  # the web process's database thread has its own
@pytest.mark.usefixtures("reply_first")
def test_a_small_result_reaches_the_agent_before_its_record_and_is_recorded_by_the_end(
    loop, upstream, monkeypatch
):
    """The reply need not wait for the result's UPDATE and commit (approvals/running.py); the
    request still ends only once they are made, with exactly what the agent was told."""
    from config.asgi import application

    server = add_demo(upstream)
    _, token = Agent.create_with_token("bot", [server])
    app, happened = _recorded_in_order(monkeypatch, application)
    response = loop.run(asgi_post(token, text=PROBE, app=app))
    assert happened == ["replied", "recorded"]
    answer = response.json()
    call = ToolCall.objects.get(pk=answer["id"])
    assert (call.status, call.result_content) == (Status.SUCCEEDED, answer["result"]["content"])
    from approvals.api import call_json

    assert json.loads(json.dumps(call_json(call), cls=DjangoJSONEncoder)) == answer


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("reply_first")
def test_a_large_result_is_recorded_before_the_agent_has_it(loop, upstream, monkeypatch):
    from approvals.models import REPLY_BEFORE_RECORD_BYTES
    from config.asgi import application

    server = add_demo(upstream)
    _, token = Agent.create_with_token("bot", [server])
    app, happened = _recorded_in_order(monkeypatch, application, hold=False)
    response = loop.run(asgi_post(token, text=PROBE + "x" * REPLY_BEFORE_RECORD_BYTES, app=app))
    assert response.json()["status"] == "succeeded"
    assert happened == ["recorded", "replied"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("reply_first")
def test_a_result_whose_record_fails_after_the_reply_is_logged_and_left_to_the_sweeper(
    loop, upstream, monkeypatch, caplog
):

    server = add_demo(upstream)
    _, token = Agent.create_with_token("bot", [server])
    transition = ToolCall._transition

    def failing(call, sources, target, *args, **fields):
        if target == Status.SUCCEEDED:
            raise OperationalError("database is locked")
        return transition(call, sources, target, *args, **fields)

    monkeypatch.setattr(ToolCall, "_transition", failing)
    answer = loop.run(asgi_post(token, text=PROBE)).json()
    assert (answer["status"], answer["result"]["content"][0]["text"]) == ("succeeded", PROBE)
    assert ToolCall.objects.get(pk=answer["id"]).status == Status.RUNNING  # `unknown` later
    assert f"Tool call {answer['id']} ran, but its result could not be recorded" in caplog.text


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("reply_first")
def test_the_mcp_endpoint_replies_before_the_record_too(loop, upstream, monkeypatch):
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    from config.asgi import application, mcp_application

    server = add_demo(upstream)
    _, token = Agent.create_with_token("bot", [server])
    app, happened = _recorded_in_order(monkeypatch, application)

    async def call():
        transport = httpx2.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {token}"}
        http = httpx2.AsyncClient(transport=transport, base_url="http://127.0.0.1", headers=headers)
        url = "http://127.0.0.1/mcp/demo/"
        session = Client(streamable_http_client(url, http_client=http))
        async with mcp_application.running(), http, session as client:
            return await client.call_tool("echo", {"text": PROBE}), list(happened)

    result, seen = loop.run(call())
    assert result.content[0].text == PROBE
    assert seen == ["replied", "recorded"]
    assert ToolCall.objects.get().status == Status.SUCCEEDED


@ON_POSTGRESQL_TOO
@ONLY_ON_POSTGRESQL
def test_on_postgresql_the_hot_statements_run_prepared_and_the_orms_others_do_not(settings):
    from approvals import policy

    server = secret_server()
    add_tool(server)
    agent, token = Agent.create_with_token("bot", [server])

    def prepared():
        with connection.cursor() as cursor:
            cursor.execute("SELECT statement FROM pg_prepared_statements")
            return {statement for (statement,) in cursor.fetchall()}

    before = prepared()
    assert [policy.find_tool(agent, "demo", "echo")[1].name for _ in range(3)] == ["echo"] * 3
    assert McpServer.objects.filter(name="demo").count() == 1  # the ORM's own SQL
    new = prepared() - before
    assert len(new) == 1, new  # the tool's lookup, prepared once, run three times
    assert next(iter(new)).startswith('SELECT "integrations_tool"."id"')
    settings.DATABASE_PREPARED_STATEMENTS = False  # e.g. behind an old PgBouncer
    assert Agent.authenticate(token) == agent
    assert prepared() - before == new


@ON_POSTGRESQL_TOO
@ONLY_ON_POSTGRESQL
@pytest.mark.django_db(transaction=True)
def test_on_postgresql_a_column_type_changed_under_a_prepared_statement_fails_no_call():
    """A migration that changes a selected column's type (here a CharField's max_length) while
    the process runs: the prepared lookup's "cached plan must not change result type" is
    answered by preparing it again, not by failing every call until the connection closes."""
    from approvals import policy

    server = secret_server()
    add_tool(server)
    agent, _ = Agent.create_with_token("bot", [server])
    assert policy.find_tool(agent, "demo", "echo")[1].name == "echo"  # prepared

    def name_type(length):
        with connection.cursor() as cursor:
            cursor.execute(
                f'ALTER TABLE integrations_tool ALTER COLUMN "name" TYPE varchar({length})'
            )

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT character_maximum_length FROM information_schema.columns"
            " WHERE table_name = 'integrations_tool' AND column_name = 'name'"
        )
        [(length,)] = cursor.fetchall()
    name_type(length + 1)
    try:
        assert [policy.find_tool(agent, "demo", "echo")[1].name for _ in range(2)] == ["echo"] * 2
    finally:
        name_type(length)
    assert policy.find_tool(agent, "demo", "echo")[1].name == "echo"


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("reply_first")
def test_a_result_the_sweeper_beat_after_the_reply_is_logged_and_the_reply_left_alone(
    loop, upstream, monkeypatch, caplog
):
    """Only the sweeper moves a `running` call on (after TOOL_CALL_LOST_AFTER): should it get
    there between the reply and the record, the result is not stored and that is logged; the
    instance the reply is made from is not read again meanwhile."""
    server = add_demo(upstream)
    _, token = Agent.create_with_token("bot", [server])
    transition, refreshed = ToolCall._transition, []

    def swept_first(call, sources, target, *args, **fields):
        if target == Status.SUCCEEDED:
            ToolCall.objects.filter(pk=call.pk).update(status=Status.UNKNOWN)
        return transition(call, sources, target, *args, **fields)

    monkeypatch.setattr(ToolCall, "_transition", swept_first)
    monkeypatch.setattr(ToolCall, "refresh_from_db", lambda call, **kw: refreshed.append(call))
    answer = loop.run(asgi_post(token, text=PROBE)).json()
    assert (answer["status"], answer["result"]["content"][0]["text"]) == ("succeeded", PROBE)
    assert ToolCall.objects.get(pk=answer["id"]).status == Status.UNKNOWN
    assert "was no longer running when the result was to be recorded" in caplog.text
    assert refreshed == []


@pytest.mark.django_db(transaction=True)
def test_by_default_a_result_is_recorded_before_the_agent_has_it(loop, upstream, monkeypatch):
    """REPLY_BEFORE_RECORD is off by default: whoever reads the call once its agent has the
    result (another process, a script) finds it recorded."""
    from config.asgi import application

    server = add_demo(upstream)
    _, token = Agent.create_with_token("bot", [server])
    app, happened = _recorded_in_order(monkeypatch, application, hold=False)
    assert loop.run(asgi_post(token, text=PROBE, app=app)).json()["status"] == "succeeded"
    assert happened == ["recorded", "replied"]
