"""A worker killed in the middle of a call: the call becomes `unknown` for a human and is
never run again on its own."""

import os
import signal
from datetime import timedelta

import pytest
from django.utils import timezone

from approvals.models import DecidedBy, Status, ToolCall
from approvals.tasks import run_tool_call
from integrations.models import Agent, ApprovalMode, McpServer
from tests.conftest import (
    _database_url,
    spawn_worker,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def tool_calls_received(running):
    return [r for r in running.requests if r.method == "POST"]


def test_a_worker_killed_mid_call_leaves_the_call_unknown(mcp_demo_http, own_broker, tmp_path):
    server = McpServer.objects.create(
        name="demo", url=mcp_demo_http.url, allow_private_network=True,
        approval_mode=ApprovalMode.NO_APPROVAL,
    )  # fmt: skip
    server.sync_tools()
    agent, _ = Agent.create_with_token("bot", [server])
    tool = server.tools.get(name="slow")
    call = ToolCall.objects.create(
        agent=agent, server=server, tool=tool, server_name="demo", tool_name="slow",
        tool_fingerprint=tool.fingerprint, arguments={"seconds": 30}, status=Status.APPROVED,
        decided_by=DecidedBy.AUTO, decided_at=timezone.now(),
    )  # fmt: skip
    connection, broker_env = own_broker
    worker = spawn_worker(
        _database_url(), broker_env, tmp_path / "doomed.log", MCP_CALL_TIMEOUT="60"
    )
    before = len(tool_calls_received(mcp_demo_http))
    with connection:
        run_tool_call.apply_async(args=[call.pk], connection=connection)

    wait_until(lambda: ToolCall.objects.get(pk=call.pk).status == Status.RUNNING)
    wait_until(
        lambda: len(tool_calls_received(mcp_demo_http)) > before + 1
    )  # it reached the server
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(timeout=20)
    sent = len(tool_calls_received(mcp_demo_http))

    started = ToolCall.objects.get(pk=call.pk).started_at
    ToolCall.objects.filter(pk=call.pk).update(started_at=started - timedelta(days=1))
    assert ToolCall.sweep()["unknown"] == 1

    call.refresh_from_db()
    assert (call.status, call.error_code) == (Status.UNKNOWN, "worker_lost")
    # A new worker on the same broker finds nothing to re-run.
    again = spawn_worker(_database_url(), broker_env, tmp_path / "after.log")
    try:
        assert ToolCall.sweep()["requeued"] == 0
        assert ToolCall.objects.get(pk=call.pk).status == Status.UNKNOWN
        assert len(tool_calls_received(mcp_demo_http)) == sent
    finally:
        # SIGTERM to the whole group would kill the pool children under the parent's warm
        # shutdown, which then waits for them forever; this worker has nothing left to finish.
        os.killpg(again.pid, signal.SIGKILL)
        again.wait(timeout=20)
