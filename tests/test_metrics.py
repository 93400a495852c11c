"""/metrics for Prometheus: the token, the figures after real calls through a real worker, the
same answer from every web process, and the checkpoint that keeps scrapes cheap."""

import os
import socket
import subprocess
import sys
import urllib.request
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from approvals import metrics
from approvals.models import DecidedBy, MetricTotals, Status, ToolCall, request_tool_call
from integrations.models import Agent, ApprovalMode, McpServer
from tests import history
from tests.conftest import ROOT, _database_url, stop_process_tree, track, wait_until

TOKEN = "scrape-me-0123456789abcdef"

pytestmark = pytest.mark.django_db


@pytest.fixture
def metrics_on(settings):
    settings.METRICS_TOKEN = TOKEN


def scrape(client=None, token=TOKEN):
    client = client or Client()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.get("/metrics", headers=headers)


def samples(text):
    """{(sample name, sorted labels): value} as Prometheus' own parser reads the page."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


def value(found, name, **labels):
    return found.get((name, tuple(sorted(labels.items()))), 0)


# --- The token --------------------------------------------------------------------------------


def test_metrics_are_off_without_a_token(settings):
    settings.METRICS_TOKEN = ""
    assert scrape().status_code == 404
    assert scrape(token="anything").status_code == 404


def test_a_scrape_needs_the_bearer_token(metrics_on):
    for token in (None, "wrong", TOKEN[:-1], TOKEN + "x"):
        response = scrape(token=token)
        assert response.status_code == 401, token
        assert response["WWW-Authenticate"].startswith("Bearer")
        assert b"toolgate_" not in response.content
    assert Client().get("/metrics", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    response = scrape()
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")


def test_prometheus_asking_for_openmetrics_gets_it(metrics_on):
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    response = Client().get(
        "/metrics", headers={"Authorization": f"Bearer {TOKEN}", "Accept": accept}
    )
    assert response["Content-Type"].startswith("application/openmetrics-text")
    text = response.content.decode()
    assert text.endswith("# EOF\n")
    names = {family.name for family in openmetrics_families(text)}
    assert {"toolgate_tool_calls", "toolgate_pending_calls", "toolgate_decision_seconds"} <= names


def test_a_short_token_stops_start_up(tmp_path):
    env = {**os.environ, "METRICS_TOKEN": "short", "TOOLGATE_VAR_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "METRICS_TOKEN must be at least 16 characters" in result.stderr


# --- The figures, after real calls -----------------------------------------------------------


def setup_demo(running, mode=ApprovalMode.NO_APPROVAL):
    server = McpServer.objects.create(
        name="demo", url=running.url, allow_private_network=True, approval_mode=mode
    )
    assert server.sync_tools().ok
    return server, Agent.create_with_token("support-bot", [server])[0]


def final(call):
    return wait_until(
        lambda: ToolCall.objects.filter(pk=call.pk, finished_at__isnull=False).first(), 60
    )


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_the_figures_after_real_calls_through_a_worker(
    metrics_on, celery_worker, mcp_demo_http, admin_user
):
    server, agent = setup_demo(mcp_demo_http)
    final(request_tool_call(agent, "demo", "echo", {"text": "hi"})[0])
    final(request_tool_call(agent, "demo", "fail", {"message": "boom"})[0])  # a tool error
    with pytest.raises(Exception):
        request_tool_call(agent, "demo", "made_up_tool", {})
    McpServer.objects.filter(pk=server.pk).update(approval_mode=ApprovalMode.ALWAYS_ASK)
    approved, _ = request_tool_call(agent, "demo", "echo", {"text": "yes"})
    denied, _ = request_tool_call(agent, "demo", "echo", {"text": "no"})
    request_tool_call(agent, "demo", "echo", {"text": "later"})  # stays pending
    assert approved.approve(admin_user) and denied.deny(admin_user, "not now")
    final(approved)

    found = samples(scrape().content.decode())
    calls = "toolgate_tool_calls_total"
    assert (
        value(found, calls, server="demo", tool="echo", status="succeeded", decided_by="auto") == 1
    )
    assert (
        value(found, calls, server="demo", tool="fail", status="succeeded", decided_by="auto") == 1
    )
    assert (
        value(found, calls, server="demo", tool="echo", status="succeeded", decided_by="human") == 1
    )
    assert value(found, calls, server="demo", tool="echo", status="denied", decided_by="human") == 1
    unknown = {"server": "demo", "tool": "(unknown)", "status": "blocked", "decided_by": "policy"}
    assert value(found, calls, **unknown) == 1
    assert not any("made_up_tool" in str(labels) for _, labels in found)
    assert value(found, "toolgate_decision_seconds_count") == 2
    assert value(found, "toolgate_decision_seconds_bucket", le="+Inf") == 2
    assert value(found, "toolgate_tool_call_seconds_count") == 3  # echo, fail, approved echo
    assert 0 < value(found, "toolgate_tool_call_seconds_sum") < 30
    assert value(found, "toolgate_pending_calls") == 1
    assert value(found, "toolgate_oldest_pending_call_seconds") > 0
    assert value(found, "toolgate_upstream_errors_total", server="demo", code="tool_error") == 1
    assert value(found, "toolgate_sync_failures_total", server="demo") == 0
    families = {family.name for family in text_string_to_metric_families(scrape().content.decode())}
    assert {
        "toolgate_notifications",
        "toolgate_tool_calls",
        "toolgate_decision_seconds",
    } <= families


def test_notifications_are_counted_by_channel_kind_and_final_status(metrics_on):
    from approvals.notifications import Delivery, NotificationChannel

    hook = NotificationChannel.objects.create(name="hook", kind="webhook", secret="s" * 20)
    mail = NotificationChannel.objects.create(name="mail", kind="email", recipients=["a@b.c"])
    for channel, status in [(hook, "sent"), (hook, "sent"), (hook, "failed"), (mail, "sent"),
                            (mail, "queued")]:  # fmt: skip
        Delivery.objects.create(channel=channel, event="call.pending", status=status)
    found = samples(scrape().content.decode())
    counted = "toolgate_notifications_total"
    assert value(found, counted, kind="webhook", status="sent") == 2
    assert value(found, counted, kind="webhook", status="failed") == 1
    assert value(found, counted, kind="email", status="sent") == 1
    assert value(found, counted, kind="email", status="queued") == 0  # not final yet


@pytest.fixture
def other_web(tmp_path, transactional_db):
    """Another web process (uvicorn) on the test database; yields its /metrics URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ, "DATABASE_URL": _database_url(), "METRICS_TOKEN": TOKEN,
        "TOOLGATE_VAR_DIR": str(tmp_path), "LOG_LEVEL": "WARNING",
    }  # fmt: skip
    command = [sys.executable, "-m", "uvicorn", "config.asgi:application", "--port", str(port)]
    with open(tmp_path / "web.log", "w") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    track(process)

    def listening():
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0 or process.poll() is not None

    wait_until(listening, 60)
    assert process.poll() is None, (tmp_path / "web.log").read_text()
    yield f"http://127.0.0.1:{port}/metrics"
    stop_process_tree(process)


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_every_web_process_gives_the_same_figures(
    metrics_on, celery_worker, mcp_demo_http, other_web
):
    _, agent = setup_demo(mcp_demo_http)
    for text in ("one", "two"):
        final(request_tool_call(agent, "demo", "echo", {"text": text})[0])
    headers = {"Authorization": f"Bearer {TOKEN}"}
    request = urllib.request.Request(other_web, headers=headers)  # noqa: S310 - loopback
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - loopback
        there = samples(response.read().decode())
    here = samples(scrape().content.decode())
    moving = {"toolgate_oldest_pending_call_seconds"}
    assert {k: v for k, v in there.items() if k[0] not in moving} == {
        k: v for k, v in here.items() if k[0] not in moving
    }
    labels = {"server": "demo", "tool": "echo", "status": "succeeded", "decided_by": "auto"}
    assert value(there, "toolgate_tool_calls_total", **labels) == 2


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_failed_syncs_are_counted_per_server(metrics_on, mcp_factory):
    from tests.mcp_servers import demo_server

    running = mcp_factory(demo_server())
    server, _ = setup_demo(running)
    running.stop()
    assert not server.sync_tools().ok
    assert not server.sync_tools().ok
    assert server.failed_syncs_total == 2
    found = samples(scrape().content.decode())
    assert value(found, "toolgate_sync_failures_total", server="demo") == 2


# --- The checkpoint ----------------------------------------------------------------------------


def seeded_history(now):
    crm = history.server_with_tools("crm", ("lookup", "refund"))
    agent = history.agent("support-bot", crm)
    for days in (30, 3, 1):
        history.calls(
            4, agent, crm, "lookup", now - timedelta(days=days), decided_by=DecidedBy.AUTO
        )
        history.calls(2, agent, crm, "refund", now - timedelta(days=days), Status.DENIED)
        history.call(
            agent, crm, "refund", now - timedelta(days=days), Status.FAILED, error_code="timeout"
        )
    return crm, agent


def test_totals_through_the_checkpoint_equal_a_full_recount(metrics_on):
    now = timezone.now()
    crm, agent = seeded_history(now)
    everything = metrics.totals_between(None, None)
    assert metrics.current_totals(now) == everything  # the first scrape makes the checkpoint
    checkpoint = MetricTotals.objects.get()
    assert checkpoint.through == now - metrics.SETTLE

    # New calls: counted by the next scrape on top of the checkpoint.
    history.calls(3, agent, crm, "lookup", now - timedelta(minutes=1), decided_by=DecidedBy.AUTO)
    history.call(
        agent, crm, "refund", now - timedelta(minutes=1), Status.DENIED, decision_seconds=5
    )
    assert metrics.current_totals(now) == metrics.totals_between(None, None)
    assert MetricTotals.objects.get().through == checkpoint.through  # not due yet

    later = now + timedelta(hours=2)
    assert metrics.current_totals(later) == metrics.totals_between(None, None)
    assert MetricTotals.objects.get().through == later - metrics.SETTLE
    found = samples(scrape().content.decode())
    auto = {"server": "crm", "tool": "lookup", "status": "succeeded", "decided_by": "auto"}
    assert value(found, "toolgate_tool_calls_total", **auto) == 15
    assert value(found, "toolgate_upstream_errors_total", server="crm", code="timeout") == 3
    assert value(found, "toolgate_decision_seconds_count") == 10  # 7 denied, 3 approved
    assert value(found, "toolgate_decision_seconds_bucket", le="5.0") == 1


def test_a_scrape_reads_only_what_came_after_the_checkpoint(
    metrics_on, django_assert_max_num_queries
):
    now = timezone.now()
    seeded_history(now)
    metrics.current_totals(now)
    # Old history changed behind the checkpoint's back is not read again: the proof that a scrape
    # does not aggregate the whole table.
    ToolCall.objects.filter(finished_at__lt=now - timedelta(days=2)).update(status=Status.EXPIRED)
    assert metrics.current_totals(now) != metrics.totals_between(None, None)
    with django_assert_max_num_queries(12):
        assert scrape().status_code == 200


def test_a_periodic_task_keeps_the_checkpoint_fresh(settings):
    from approvals.tasks import update_metric_totals

    entry = settings.CELERY_BEAT_SCHEDULE["update-metric-totals"]
    assert entry["task"] == "approvals.tasks.update_metric_totals"
    assert entry["options"]["expires"] < entry["schedule"].total_seconds()
    seeded_history(timezone.now())
    update_metric_totals()
    assert MetricTotals.objects.get().totals == metrics.totals_between(
        None, MetricTotals.objects.get().through
    )
