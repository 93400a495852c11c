"""Calls a worker runs (human-approved ones) on pooled upstream sessions: each prefork child
keeps an event loop on a thread of its own with the web process's session pool
(integrations/mcp_pool.py `run_in_loop_thread`), and Celery's soft time limit still stops a
hung call."""

import asyncio
import os
import signal

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from django.utils import timezone

from approvals.models import DecidedBy, Status, ToolCall
from approvals.tasks import run_tool_call
from integrations import mcp_client, mcp_pool
from integrations.models import Agent
from tests.conftest import _database_url, spawn_worker, stop_process_tree, wait_until
from tests.test_mcp_pool import add_demo, endpoint_of


def approved_call(server, agent, tool="echo", arguments=None):
    tool = server.tools.get(name=tool)
    return ToolCall.objects.create(
        agent=agent, server=server, tool=tool, server_name=server.name, tool_name=tool.name,
        tool_fingerprint=tool.fingerprint, arguments=arguments or {"text": "hi"},
        status=Status.APPROVED, decided_by=DecidedBy.HUMAN, decided_at=timezone.now(),
    )  # fmt: skip


def run_in_worker(connection, call, **limits):
    with connection:
        run_tool_call.apply_async(args=[call.pk], connection=connection, **limits)
    return wait_until(
        lambda: ToolCall.objects.filter(pk=call.pk, finished_at__isnull=False).first(), timeout=60
    )


# Through a real worker -------------------------------------------------------------------


@pytest.fixture
def worker(own_broker, tmp_path):
    """`worker(name, **env)` starts a real worker (one prefork child) on the test's own broker;
    each is stopped when the test ends, passed or failed: a worker left running until the end
    of the run would keep working on later tests' rows and hold the test database, which then
    could not be dropped."""
    started = []

    def start(name, **env):
        log = tmp_path / f"{name}.log"
        process = spawn_worker(_database_url(), own_broker[1], log, concurrency=1, **env)
        started.append(process)
        return process

    yield start
    for process in started:
        stop_process_tree(process)


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_approved_calls_through_a_worker_share_one_upstream_session(upstream, own_broker, worker):
    server = add_demo(upstream)
    agent, _ = Agent.create_with_token("bot", [server])
    connection, _ = own_broker
    worker("pooled")
    methods = upstream.recording
    before = {m: methods.count(m) for m in ("server/discover", "tools/list", "tools/call")}

    for i in range(3):
        call = run_in_worker(connection, approved_call(server, agent, arguments={"text": f"{i}"}))
        assert (call.status, call.result_content[0]["text"]) == (Status.SUCCEEDED, f"{i}")

    after = {m: methods.count(m) - before[m] for m in before}
    # No `tools/list`: the SDK's output-schema check, which listed the tools first, is not run
    # (mcp_client._no_output_check).
    assert after == {"server/discover": 1, "tools/list": 0, "tools/call": 3}

    # Edited in this process: the worker's next call has another connection key, so a new
    # session with the header as it is now (the web process's other processes learn it so).
    server.headers = {"X-Tenant": "edited"}
    server.save()
    sent = len(upstream.requests)
    call = run_in_worker(connection, approved_call(server, agent))
    assert call.status == Status.SUCCEEDED
    tenants = {r.headers.get("x-tenant") for r in upstream.requests[sent:] if r.method == "POST"}
    assert tenants == {"edited"}
    assert methods.count("server/discover") - before["server/discover"] == 2


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_hung_call_in_the_worker_ends_at_its_time_limit_and_the_next_call_runs(
    upstream, own_broker, worker
):
    server = add_demo(upstream)
    agent, _ = Agent.create_with_token("bot", [server])
    connection, _ = own_broker
    worker("hung", MCP_CALL_TIMEOUT="120", MCP_READ_TIMEOUT="120")
    assert run_in_worker(connection, approved_call(server, agent)).status == Status.SUCCEEDED
    calls = upstream.recording.count("tools/call")

    hung = approved_call(server, agent, "slow", {"seconds": 60})  # on the open session
    hung = run_in_worker(connection, hung, soft_time_limit=2, time_limit=17)
    assert (hung.status, hung.error_code) == (Status.FAILED, "timeout")
    assert "will not be run again" in hung.error_message
    assert upstream.recording.count("tools/call") == calls + 1  # it reached the server

    after = run_in_worker(connection, approved_call(server, agent, arguments={"text": "next"}))
    assert (after.status, after.result_content[0]["text"]) == (Status.SUCCEEDED, "next")
    assert ToolCall.sweep()["requeued"] == 0
    assert upstream.recording.count("tools/call") == calls + 2  # the hung one never again


# The loop thread, in this process ----------------------------------------------------------


def interrupted_after(seconds):
    """Raise SoftTimeLimitExceeded in this (the main) thread from a signal handler after
    `seconds`, as Celery's soft time limit does in a prefork child."""

    def handler(signum, frame):
        raise SoftTimeLimitExceeded()

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    return previous


def test_the_soft_time_limit_cancels_the_call_on_the_loop_thread(upstream, settings):
    settings.MCP_CALL_TIMEOUT = settings.MCP_READ_TIMEOUT = 120
    endpoint = endpoint_of(upstream)
    assert mcp_client.call_tool(endpoint, "echo", {"text": "a"}, pooled=True).content
    pool = mcp_pool.run_in_loop_thread(lambda: asyncio.sleep(0, mcp_pool.pool()))
    opened, calls = pool.opened, upstream.recording.count("tools/call")

    previous = interrupted_after(0.5)
    try:
        with pytest.raises(SoftTimeLimitExceeded):
            mcp_client.call_tool(endpoint, "slow", {"seconds": 60}, pooled=True)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert upstream.recording.count("tools/call") == calls + 1
    assert [s for s in mcp_pool.Session._busy if s.pool is pool] == []  # cancelled, closed
    assert pool.idle_count() == 0  # its session was not kept for the next call

    result = mcp_client.call_tool(endpoint, "echo", {"text": "b"}, pooled=True)
    assert result.content[0]["text"] == "b"
    assert pool.opened == opened + 1


def test_without_the_pool_a_worker_call_opens_its_own_session(upstream, settings):
    settings.MCP_POOL_SESSIONS = 0
    for _ in range(2):
        mcp_client.call_tool(endpoint_of(upstream), "echo", {"text": "x"}, pooled=True)
    assert upstream.recording.count("server/discover") == 2


def test_a_forked_child_makes_a_loop_thread_of_its_own():
    parent = mcp_pool.loop_thread()
    assert mcp_pool.run_in_loop_thread(lambda: asyncio.sleep(0, "parent")) == "parent"
    pid = os.fork()
    if pid == 0:  # the child: the parent's loop thread did not come along
        try:
            child = mcp_pool.loop_thread()
            ran = mcp_pool.run_in_loop_thread(lambda: asyncio.sleep(0, "child"))
            os._exit(0 if child is not parent and ran == "child" else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert mcp_pool.loop_thread() is parent


def test_the_loop_threads_sessions_can_be_closed_at_once(upstream):
    mcp_client.call_tool(endpoint_of(upstream), "echo", {"text": "x"}, pooled=True)
    pool = mcp_pool.run_in_loop_thread(lambda: asyncio.sleep(0, mcp_pool.pool()))
    assert pool.idle_count() == 1
    mcp_pool.close_loop_thread_sessions()
    assert (pool.idle_count(), len(pool.eras)) == (0, 0)
    mcp_client.call_tool(endpoint_of(upstream), "echo", {"text": "x"}, pooled=True)
    assert upstream.recording.count("server/discover") == 2  # the era learned again
