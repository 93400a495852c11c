"""Waking waiting agents when their call is final (approvals/wakeup.py), not by polling.

The safety poll is set to a minute and every wait to 20 s, so a waiter that returns woken
(True) with its call final was woken by the announcement of the process that finished it."""

import asyncio
import os
import socket
import sys

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection, connections

from approvals import waiting, wakeup
from approvals.models import Status, ToolCall, request_tool_call
from approvals.waiting import wait_until_final
from integrations.models import Agent, ApprovalMode, McpServer
from tests.conftest import ROOT, _database_url

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

ON_REDIS = settings.CELERY_BROKER_URL.startswith("redis://")


@pytest.fixture(autouse=True)
def _slow_safety_poll(monkeypatch):
    monkeypatch.setattr(waiting, "POLL_SECONDS", 60)


def pending_call(running):
    server = McpServer.objects.create(
        name="demo", url=running.url, allow_private_network=True,
        approval_mode=ApprovalMode.ALWAYS_ASK,
    )  # fmt: skip
    assert server.sync_tools().ok
    agent, _ = Agent.create_with_token("bot", [server])
    call, _ = request_tool_call(agent, "demo", "echo", {"text": "hello"})
    assert call.status == Status.PENDING_APPROVAL
    return call


def kinds():
    """The wake-up transports this pass can test: the database's and the broker's."""
    if connection.vendor == "postgresql":
        return ["postgres", "redis"] if ON_REDIS else ["postgres"]
    return ["doorbell", "redis"] if ON_REDIS else ["doorbell"]


def run(scenario):
    """`asyncio.run`, then close the database connection the waiters' checks opened on
    asgiref's thread (PostgreSQL won't drop the test database while it is open)."""

    async def then_close():
        try:
            return await scenario
        finally:
            await sync_to_async(connections.close_all)()

    return asyncio.run(then_close())


async def wait_while(call_id, finish):
    """Start waiting for the call, then `await finish()` elsewhere; return what the wait did."""
    waiter = asyncio.create_task(wait_until_final(call_id, 20))
    await asyncio.sleep(0.5)  # the listener subscribes before anything can be announced
    await finish()
    return await waiter


@pytest.mark.parametrize("kind", ["doorbell", "postgres", "redis"])
def test_a_waiter_wakes_when_another_process_finishes_the_call(
    kind, mcp_demo_http, celery_broker, settings
):
    if kind not in kinds():
        pytest.skip(f"{kind} is not a wake-up of this pass's database and broker")
    settings.TOOL_CALL_WAKEUP = kind
    call = pending_call(mcp_demo_http)
    env = {
        **os.environ,
        **celery_broker,
        "DATABASE_URL": _database_url(),
        "TOOL_CALL_WAKEUP": kind,
    }
    code = (
        f"from approvals.models import ToolCall; assert ToolCall.objects.get(pk={call.pk}).cancel()"
    )

    async def cancel_in_another_process():
        process = await asyncio.create_subprocess_exec(
            sys.executable, "manage.py", "shell", "-c", code, cwd=ROOT, env=env
        )
        assert await process.wait() == 0

    woken = run(wait_while(call.pk, cancel_in_another_process))
    assert woken is True
    assert ToolCall.objects.get(pk=call.pk).status == Status.CANCELLED


def test_a_waiter_wakes_when_the_worker_runs_the_approved_call(
    celery_worker, mcp_demo_http, admin_user
):
    call = pending_call(mcp_demo_http)

    async def approve():
        assert await sync_to_async(call.approve)(admin_user)

    woken = run(wait_while(call.pk, approve))
    assert woken is True
    call.refresh_from_db()
    assert (call.status, call.result_content[0]["text"]) == (Status.SUCCEEDED, "hello")


def test_a_waiter_wakes_at_once_when_its_own_process_finishes_the_call(mcp_demo_http, settings):
    settings.TOOL_CALL_WAKEUP = "poll"  # no other process could tell it
    call = pending_call(mcp_demo_http)

    async def cancel_here():
        assert await sync_to_async(call.cancel)()

    assert run(wait_while(call.pk, cancel_here)) is True


def test_a_waiter_that_starts_just_after_the_announcement_returns_at_once(mcp_demo_http, settings):
    settings.TOOL_CALL_WAKEUP = "poll"
    call, other = pending_call(mcp_demo_http), None

    async def scenario():
        # Another agent's wait starts the registry; then the call finishes, then its waiter
        # (which read the call while it was still pending) begins to wait.
        nonlocal other
        other = asyncio.create_task(wait_until_final(call.pk + 1000, 1))
        await asyncio.sleep(0.1)
        assert await sync_to_async(call.cancel)()
        await asyncio.sleep(0.1)
        woken = await wait_until_final(call.pk, 20)
        await other
        return woken

    assert run(scenario()) is True


def test_announcing_on_a_redis_that_does_not_answer_holds_up_no_one(settings):
    """The PUBLISH goes out on the process's publisher thread: the thread that finished the
    call (in the web process, the database thread every agent's request shares) goes on at
    once, even while Redis doesn't answer at all."""
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        # Not a Redis: a socket of this test's own that never answers, so no database is named.
        settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{mute.getsockname()[1]}"

        wakeup.Redis().publish(123)  # returns though nothing has answered

        mute.settimeout(30)
        connected, _ = mute.accept()  # the publisher thread tries, behind it
        connected.close()
