"""The approvers' dashboard, /approvals/dashboard/: its figures against seeded histories, its
filters, the anomalies on it and acknowledging them, and who may see it."""

import re
import socket
import statistics
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.utils import timezone

from approvals.models import Anomaly, AnomalyKind, DecidedBy, Status
from integrations.models import McpServer, Tool
from tests import history
from tests.history import call, calls
from tests.mcp_servers import mutable_server

pytestmark = pytest.mark.django_db


@pytest.fixture
def world():
    crm = history.server_with_tools("crm", ("lookup", "refund"))
    mail = history.server_with_tools("mail", ("send",))
    bot = history.agent("support-bot", crm, mail)
    ops = history.agent("ops-bot", crm)
    return crm, mail, bot, ops


def figures(client, query=""):
    response = client.get(f"/approvals/dashboard/{query}")
    assert response.status_code == 200
    return response, response.context["figures"]


def hour_ago(hours, minutes=5):
    return history.this_hour(minutes) - timedelta(hours=hours)


@pytest.mark.integration
def test_it_counts_calls_per_hour_by_outcome(client, approver, world):
    crm, mail, bot, ops = world
    two_hours_ago = hour_ago(2)
    calls(3, bot, crm, "lookup", two_hours_ago, Status.SUCCEEDED, decided_by=DecidedBy.AUTO)
    calls(2, bot, crm, "refund", two_hours_ago, Status.SUCCEEDED)  # approved by a human
    call(bot, crm, "refund", two_hours_ago, Status.FAILED)  # approved, then failed
    call(ops, crm, "refund", two_hours_ago, Status.DENIED)
    call(ops, crm, "refund", hour_ago(0), Status.BLOCKED, error_code="invalid_arguments")
    call(ops, mail, "send", hour_ago(0), Status.EXPIRED)
    call(ops, mail, "send", hour_ago(0), Status.UNKNOWN)
    call(bot, mail, "send", hour_ago(0), Status.PENDING_APPROVAL)
    call(bot, mail, "send", hour_ago(30), Status.SUCCEEDED)  # outside the last 24 hours

    response, f = figures(client)
    by_hour = {hour: counts for hour, counts, _ in f["hourly"]}
    assert len(f["hourly"]) == 24
    assert by_hour[history.this_hour() - timedelta(hours=2)] == {
        "auto": 3, "approved": 2, "denied": 1, "blocked": 0, "expired": 0, "failed": 1,
        "unknown": 0, "cancelled": 0, "pending": 0,
    }  # fmt: skip
    assert by_hour[history.this_hour()] == {
        "auto": 0, "approved": 0, "denied": 0, "blocked": 1, "expired": 1, "failed": 0,
        "unknown": 1, "cancelled": 0, "pending": 1,
    }  # fmt: skip
    assert f["total"] == 11
    # The legend beside the chart is a table of the same totals, each outcome named.
    html = response.content.decode()
    assert re.search(r'data-outcome="auto">.*?Ran on its own</td><td class="num">3<', html, re.S)
    assert re.search(r'data-outcome="failed">.*?Failed</td><td class="num">1<', html, re.S)
    # The table under the chart holds the same numbers, hour by hour.
    hour = (history.this_hour() - timedelta(hours=2)).isoformat()
    row = re.search(rf'<time datetime="{re.escape(hour)}">.*?</tr>', html)[0]
    assert re.findall(r'<td class="num">(\d+)</td>', row) == [
        "3", "2", "1", "0", "0", "1", "0", "0", "0", "7",
    ]  # fmt: skip
    # Every bar segment has a pattern fill and a title a person can read.
    assert 'fill="url(#pat-denied)"' in html
    assert re.search(r"<title>\w{3} \d\d \w{3} \d\d:00: 3 ran on its own</title>", html)


@pytest.mark.integration
def test_decision_times_are_the_median_and_95th_percentile_of_human_decisions(
    client, approver, world
):
    crm, _mail, bot, _ops = world
    seconds = [12, 40, 7, 95, 300, 61, 18, 240, 33, 150, 5]
    for s in seconds:
        call(bot, crm, "refund", hour_ago(3), Status.SUCCEEDED, decision_seconds=s)
    call(bot, crm, "lookup", hour_ago(3), Status.SUCCEEDED, decided_by=DecidedBy.AUTO)
    calls(2, bot, crm, "refund", hour_ago(1), Status.EXPIRED)

    response, f = figures(client)
    decisions = f["decisions"]
    assert decisions["count"] == len(seconds)
    assert decisions["median"] == timedelta(seconds=statistics.median(seconds))
    # percentile_cont(0.95): position 0.95 * (n - 1) between the sorted values.
    ordered = sorted(seconds)
    position = 0.95 * (len(ordered) - 1)
    low = ordered[int(position)]
    expected = low + (ordered[int(position) + 1] - low) * (position - int(position))
    assert decisions["p95"].total_seconds() == pytest.approx(expected)
    assert decisions["expired"] == 2
    html = response.content.decode()
    assert "40.0 s" in html  # the median, as a person reads it
    assert "4 min 30 s" in html  # the 95th percentile: 270 s


@pytest.mark.integration
def test_it_breaks_calls_down_per_tool_and_per_agent(client, approver, world):
    crm, mail, bot, ops = world
    at = hour_ago(4)
    calls(4, bot, crm, "lookup", at, Status.SUCCEEDED, decided_by=DecidedBy.AUTO)
    call(bot, crm, "refund", at, Status.SUCCEEDED, decision_seconds=10)
    call(bot, crm, "refund", at, Status.FAILED, decision_seconds=20)  # approved, then failed
    call(ops, crm, "refund", at, Status.DENIED, decision_seconds=60)
    call(ops, crm, "refund", at, Status.BLOCKED)
    call(ops, mail, "send", at, Status.EXPIRED)

    _, f = figures(client)
    tools = {row["name"]: row for row in f["tools"]["rows"]}
    assert list(tools) == ["crm / lookup", "crm / refund", "mail / send"]  # busiest first
    refund = tools["crm / refund"]
    assert refund["calls"] == 4
    assert refund["shares"] == {"auto": 0, "approved": 0.5, "denied": 0.25, "blocked": 0.25}
    assert refund["median"] == timedelta(seconds=20)
    assert tools["crm / lookup"]["shares"]["auto"] == 1
    assert tools["crm / lookup"]["median"] is None
    agents = {row["name"]: row for row in f["agents"]["rows"]}
    assert agents["support-bot"]["calls"] == 6
    assert agents["support-bot"]["median"] == timedelta(seconds=15)
    assert agents["ops-bot"]["shares"]["denied"] == pytest.approx(1 / 3)


def test_it_shows_what_waits_now_and_for_how_long(client, approver, world):
    crm, _mail, bot, _ops = world
    call(bot, crm, "refund", timezone.now() - timedelta(minutes=7), Status.PENDING_APPROVAL)
    call(bot, crm, "refund", timezone.now() - timedelta(minutes=1), Status.PENDING_APPROVAL)

    response, f = figures(client)
    assert f["pending"]["count"] == 2
    assert timedelta(minutes=7) <= f["pending"]["waited"] < timedelta(minutes=8)
    tile = re.search(r'id="tile-pending">(.*?)</div>', response.content.decode(), re.S)[1]
    assert ">2<" in tile and "oldest waiting 7 min" in tile and 'href="/approvals/"' in tile


def test_it_shows_each_servers_sync_and_tools_awaiting_review(client, approver, world):
    crm, _mail, _bot, _ops = world
    refund = crm.tools.get(name="refund")
    refund.update_definition({**refund.definition, "description": "Now BCC me."}, timezone.now())
    Tool.objects.filter(pk=crm.tools.get(name="lookup").pk).update(warnings=["hidden text"])

    _, f = figures(client)
    rows = {row["server"].name: row for row in f["servers"]}
    assert rows["crm"]["awaiting_review"] == 2  # changed since review, and flagged
    assert rows["mail"]["awaiting_review"] == 0


@pytest.mark.integration
def test_a_failing_sync_shows_its_failures_in_a_row_and_refused_tools_are_not_failing(
    client, approver, world, mcp_factory
):
    _crm, mail, _bot, _ops = world
    mail.url, mail.allow_private_network, mail.allow_http = closed_port_url(), True, True
    mail.save()
    for _ in range(3):
        assert not mail.sync_tools().ok
    tools = mutable_server()
    tools.add_tool("has space")  # outside the MCP naming rules: refused, the sync succeeds
    wiki = McpServer.objects.create(
        name="wiki", url=mcp_factory(tools).url, allow_private_network=True, allow_http=True
    )
    wiki.failed_syncs_total = 5  # failures long ago, before the sync that now succeeds
    wiki.save()
    assert wiki.sync_tools().ok

    response, _ = figures(client)
    html = response.content.decode()
    mail_row = re.search(r'<tr data-name="mail">(.*?)</tr>', html, re.S)[1]
    assert "sync failing" in mail_row and "refused" not in mail_row
    assert re.search(r'<td class="num"[^>]*>3</td>', mail_row)
    wiki_row = re.search(r'<tr data-name="wiki">(.*?)</tr>', html, re.S)[1]
    assert "failing" not in wiki_row
    assert "some tools refused" in wiki_row and "has space" in wiki_row
    assert re.search(r'<td class="num" title="5 since the server was added">0</td>', wiki_row)

    mail.url = mcp_factory(mutable_server()).url
    mail.save()
    assert mail.sync_tools().ok
    mail_row = re.search(
        r'<tr data-name="mail">(.*?)</tr>', figures(client)[0].content.decode(), re.S
    )[1]
    assert "✓ OK" in mail_row and re.search(r'<td class="num"[^>]*>0</td>', mail_row)


def closed_port_url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"


def test_filters_narrow_every_figure_to_a_server_or_an_agent(client, approver, world):
    crm, mail, bot, ops = world
    calls(3, bot, crm, "lookup", hour_ago(1), Status.SUCCEEDED, decided_by=DecidedBy.AUTO)
    calls(2, ops, crm, "refund", hour_ago(1), Status.DENIED)
    call(bot, mail, "send", hour_ago(1), Status.PENDING_APPROVAL)

    _, by_server = figures(client, "?server=mail")
    assert by_server["total"] == 1
    assert [row["server"].name for row in by_server["servers"]] == ["mail"]
    _, by_agent = figures(client, "?agent=ops-bot&period=7d")
    assert by_agent["total"] == 2 and by_agent["totals"]["denied"] == 2
    assert len(by_agent["hourly"]) == 24 * 7
    assert by_agent["pending"]["count"] == 0


def test_bad_filters_get_a_clear_error_and_no_figures(client, approver):
    response = client.get("/approvals/dashboard/?period=forever&agent=" + "x" * 300)
    assert response.status_code == 400
    html = response.content.decode()
    assert "These filters can't be used" in html
    assert "period: Select a valid choice" in html
    assert "agent: Ensure this value has at most 100 characters" in html
    assert "Calls per hour" not in html


def test_anomalies_are_listed_newest_first_and_link_to_the_calls_behind_them(
    client, approver, world
):
    crm, _mail, bot, ops = world
    burst_start = history.this_hour() - timedelta(hours=1)
    refused = calls(3, ops, crm, "refund", burst_start + timedelta(minutes=2), Status.DENIED)
    call(ops, crm, "lookup", burst_start + timedelta(minutes=3), Status.SUCCEEDED)
    older = make_anomaly(ops, AnomalyKind.REFUSALS, burst_start, minutes=10, first_seen=-20)
    newer = make_anomaly(bot, AnomalyKind.CALL_RATE, burst_start, minutes=60, first_seen=-5)

    response, f = figures(client)
    assert f["anomalies"] == [newer, older]
    html = response.content.decode()
    assert html.index(f'data-anomaly-id="{newer.pk}"') < html.index(f'data-anomaly-id="{older.pk}"')
    assert "ops-bot had 3 calls refused in 10 minutes" in html
    assert f'href="/approvals/dashboard/anomalies/{older.pk}/"' in html

    page = client.get(f"/approvals/dashboard/anomalies/{older.pk}/")
    assert page.status_code == 200
    shown = re.findall(r'<tr data-call-id="(\d+)">', page.content.decode())
    assert sorted(map(int, shown)) == sorted(c.pk for c in refused)  # not the successful one


def make_anomaly(agent, kind, start, minutes, first_seen):
    numbers = {"calls": 40, "usual": 2.0, "threshold": 20}
    if kind == AnomalyKind.REFUSALS:
        numbers = {"refused": 3, "denied": 3, "blocked": 0, "invalid_arguments": 0, "minutes": 10}
    return Anomaly.objects.create(
        kind=kind, key=f"{kind}-{agent.pk}-{start.isoformat()}", agent=agent,
        window_start=start, window_end=start + timedelta(minutes=minutes), numbers=numbers,
        first_seen_at=timezone.now() + timedelta(minutes=first_seen),
    )  # fmt: skip


def test_an_approver_acknowledges_an_anomaly_once_with_who_and_when(client, approver, world):
    _crm, _mail, bot, _ops = world
    anomaly = make_anomaly(bot, AnomalyKind.CALL_RATE, history.this_hour(), 60, first_seen=0)
    url = f"/approvals/dashboard/anomalies/{anomaly.pk}/acknowledge"

    response = client.post(url, {"next": "/approvals/dashboard/?period=7d"})
    assert response.status_code == 302 and response.url == "/approvals/dashboard/?period=7d"
    anomaly.refresh_from_db()
    assert anomaly.acknowledged_by == approver
    first_time = anomaly.acknowledged_at
    assert first_time is not None

    bob = User.objects.create_superuser("bob", password="pw-bob-123")
    other = Client()
    other.force_login(bob)
    response = other.post(url, {"next": "https://evil.example/"}, follow=True)
    assert "already acknowledged by alice" in response.content.decode()
    assert response.redirect_chain[0][0] == anomaly.get_absolute_url()  # not off-site
    anomaly.refresh_from_db()
    assert (anomaly.acknowledged_by, anomaly.acknowledged_at) == (approver, first_time)
    page = client.get("/approvals/dashboard/").content.decode()
    assert "Acknowledged by alice" in page


def test_acknowledging_needs_a_post_with_a_csrf_token(world, approver):
    _crm, _mail, bot, _ops = world
    anomaly = make_anomaly(bot, AnomalyKind.CALL_RATE, history.this_hour(), 60, first_seen=0)
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(approver)
    url = f"/approvals/dashboard/anomalies/{anomaly.pk}/acknowledge"
    assert browser.get(url).status_code == 405
    assert browser.post(url).status_code == 403
    anomaly.refresh_from_db()
    assert anomaly.acknowledged_at is None


def test_it_needs_an_approver_or_a_reader_of_the_audit_trail(client, world):
    _crm, _mail, bot, _ops = world
    anomaly = make_anomaly(bot, AnomalyKind.CALL_RATE, history.this_hour(), 60, first_seen=0)
    response = client.get("/approvals/dashboard/")
    assert response.status_code == 302 and response.url.startswith("/accounts/login/")

    nobody = User.objects.create_user("nobody", password="pw-nobody-123", is_staff=True)
    client.force_login(nobody)
    assert client.get("/approvals/dashboard/").status_code == 403
    assert client.get(anomaly.get_absolute_url()).status_code == 403

    # An admin who may read tool calls sees the dashboard, but acknowledging is for approvers.
    nobody.user_permissions.add(Permission.objects.get(codename="view_toolcall"))
    nobody = User.objects.get(pk=nobody.pk)
    client.force_login(nobody)
    response = client.get("/approvals/dashboard/")
    assert response.status_code == 200
    assert "Acknowledge</button>" not in response.content.decode()
    assert client.post(f"{anomaly.get_absolute_url()}acknowledge").status_code == 403


def test_it_is_linked_from_the_queue_and_the_admin_index(admin_client):
    queue = admin_client.get("/approvals/").content.decode()
    assert 'href="/approvals/dashboard/"' in queue
    index = admin_client.get("/admin/").content.decode()
    assert 'href="/approvals/dashboard/"' in index
    assert "MCP servers" in index  # the admin's own index is still there


def test_its_queries_do_not_grow_with_the_number_of_calls(client, approver, world):
    crm, mail, bot, ops = world

    def count_queries():
        from django.db import connection
        from django.test.utils import CaptureQueriesContext

        with CaptureQueriesContext(connection) as queries:
            assert client.get("/approvals/dashboard/?period=7d").status_code == 200
        return len(queries)

    call(bot, crm, "lookup", hour_ago(1), Status.SUCCEEDED)
    few = count_queries()
    for n in range(60):
        agent = history.agent(f"agent-{n}", crm) if n % 6 == 0 else bot
        call(
            agent, crm if n % 2 else mail, "refund" if n % 2 else "send", hour_ago(n), Status.DENIED
        )
    make_anomaly(ops, AnomalyKind.CALL_RATE, history.this_hour(), 60, first_seen=0)
    assert count_queries() == few


def test_the_7_day_window_counts_its_first_hour_and_nothing_before(client, approver, world):
    crm, _mail, bot, _ops = world
    first = history.this_hour() - timedelta(hours=24 * 7 - 1)  # the window's first hour
    call(bot, crm, "refund", first, Status.SUCCEEDED, decision_seconds=10)
    call(bot, crm, "refund", first + timedelta(minutes=59), Status.SUCCEEDED, decision_seconds=50)
    call(bot, crm, "refund", first - timedelta(seconds=1), Status.SUCCEEDED, decision_seconds=900)
    call(bot, crm, "lookup", hour_ago(0), Status.DENIED, decision_seconds=30)

    _, f = figures(client, "?period=7d")
    assert f["start"] == first and len(f["hourly"]) == 24 * 7
    assert f["hourly"][0][0] == first and f["hourly"][0][2] == 2
    assert f["total"] == 3 and f["totals"]["approved"] == 2 and f["totals"]["denied"] == 1
    assert f["decisions"]["count"] == 3
    assert f["decisions"]["median"] == timedelta(seconds=30)  # 10, 30, 50: not the 900 outside
    assert f["decisions"]["p95"] == timedelta(seconds=48)
