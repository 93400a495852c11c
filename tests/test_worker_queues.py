"""Worker queues and time limits: calls, syncs and deliveries each on a queue of their own, and
a call that runs past its worker's time limit ends failed, never run again."""

import os
import signal

import pytest
from django.conf import settings
from django.utils import timezone

from approvals.models import DecidedBy, Status, ToolCall
from approvals.tasks import flush_notifications, run_tool_call, sweep_tool_calls
from integrations.models import Agent, ApprovalMode, McpServer
from integrations.tasks import sync_all_servers, sync_server
from tests.conftest import (
    _database_url,
    spawn_worker,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def waiting_messages(connection, queue):
    """How many messages `queue` holds (taking them: the broker is this test's own)."""
    with connection.channel() as channel:
        return sum(1 for _ in iter(lambda: channel.basic_get(queue, no_ack=True), None))


def test_each_kind_of_task_is_sent_to_its_own_queue(own_broker):
    connection, _ = own_broker
    sent = {
        run_tool_call: "calls",
        sync_server: "syncs",
        sync_all_servers: "syncs",
        flush_notifications: "notifications",
        sweep_tool_calls: "celery",
    }
    with connection:
        for task in sent:
            task.apply_async(args=[] if task in (sync_all_servers, sweep_tool_calls) else [1],
                             connection=connection)  # fmt: skip
        counts = {
            queue: waiting_messages(connection, queue)
            for queue in ("calls", "syncs", "notifications", "celery")
        }
    assert counts == {"calls": 1, "syncs": 2, "notifications": 1, "celery": 1}


def test_a_call_over_its_time_limit_fails_and_is_not_run_again(mcp_demo_http, own_broker, tmp_path):
    server = McpServer.objects.create(
        name="demo", url=mcp_demo_http.url, allow_private_network=True,
        approval_mode=ApprovalMode.NO_APPROVAL,
    )  # fmt: skip
    assert server.sync_tools().ok
    agent, _ = Agent.create_with_token("bot", [server])
    tool = server.tools.get(name="slow")
    call = ToolCall.objects.create(
        agent=agent, server=server, tool=tool, server_name="demo", tool_name="slow",
        tool_fingerprint=tool.fingerprint, arguments={"seconds": 60}, status=Status.APPROVED,
        decided_by=DecidedBy.AUTO, decided_at=timezone.now(),
    )  # fmt: skip
    connection, broker_env = own_broker
    # Stopped at the end of the test, not of the run: on PostgreSQL its children keep their
    # connections between tasks, and the test database can't be dropped while they are open.
    worker = spawn_worker(
        _database_url(), broker_env, tmp_path / "limited.log",
        MCP_CALL_TIMEOUT="120", MCP_READ_TIMEOUT="120", TOOL_CALL_TIME_LIMIT="2",
    )  # fmt: skip
    try:
        _time_limited_call(call, connection, mcp_demo_http)
    finally:
        os.killpg(worker.pid, signal.SIGKILL)  # nothing left to finish (see test_worker_lost)
        worker.wait(timeout=20)


def _time_limited_call(call, connection, mcp_demo_http):
    posts = lambda: sum(r.method == "POST" for r in mcp_demo_http.requests)  # noqa: E731
    before = posts()
    # The limits travel in the message (the sender's settings): this one's are the worker's.
    limit = settings.TOOL_CALL_TIME_LIMIT
    assert (run_tool_call.soft_time_limit, run_tool_call.time_limit) == (limit, limit + 15)
    assert sync_server.soft_time_limit == settings.SYNC_TIME_LIMIT
    with connection:
        run_tool_call.apply_async(
            args=[call.pk], connection=connection, soft_time_limit=2, time_limit=17
        )

    call = wait_until(
        lambda: ToolCall.objects.filter(pk=call.pk, status=Status.FAILED).first(), timeout=60
    )
    assert call.error_code == "timeout"
    assert "time limit (2 s)" in call.error_message
    assert "will not be run again" in call.error_message
    sent = posts()
    assert sent > before  # it reached the server
    assert ToolCall.sweep()["requeued"] == 0
    assert posts() == sent
    assert ToolCall.objects.get(pk=call.pk).status == Status.FAILED
