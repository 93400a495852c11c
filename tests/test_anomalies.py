"""The anomaly scan over seeded audit trails: each kind fires where it must and stays quiet
where it must not; an anomaly is stored and announced once; the periodic task runs it."""

import json
import logging
import threading
from datetime import UTC, datetime, timedelta

import pytest
from django.conf import settings as django_settings
from django.db import connection

from approvals import anomalies
from approvals.models import Anomaly, AnomalyKind, DecidedBy, Status
from approvals.notifications import Delivery, NotificationChannel
from approvals.tasks import detect_anomalies
from tests import history
from tests.conftest import wait_until
from tests.history import call, calls, habits

pytestmark = pytest.mark.django_db

# A Tuesday afternoon; the scan judges 13:00-14:00 and 14:00-now.
NOW = datetime(2026, 3, 10, 14, 30, tzinfo=UTC)
THIS_HOUR = NOW.replace(minute=0)


@pytest.fixture(autouse=True)
def _thresholds(settings):
    settings.TIME_ZONE = "UTC"
    settings.ANOMALY_BASELINE_DAYS = 7
    settings.ANOMALY_MIN_HISTORY_DAYS = 3
    settings.ANOMALY_RATE_FACTOR = 3.0
    settings.ANOMALY_RATE_MIN_CALLS = 20
    settings.ANOMALY_USUAL_HOUR_DAYS = 2
    settings.ANOMALY_BURST_MINUTES = 10
    settings.ANOMALY_REFUSAL_BURST = 5
    settings.ANOMALY_PERSONAL_DATA_MIN_CALLS = 5
    settings.ANOMALY_ARGUMENTS_FACTOR = 10.0
    settings.ANOMALY_ARGUMENTS_MIN_BYTES = 2048
    settings.ANOMALY_ARGUMENTS_MIN_BASELINE = 20


@pytest.fixture
def crm():
    return history.server_with_tools("crm", ("lookup", "refund", "export"))


@pytest.fixture
def seasoned(crm):
    """An agent that works 09:00-18:00 every day of the last week: two lookups an hour, and a
    refund at ten."""
    agent = history.agent("support-bot", crm)
    habits(agent, crm, "lookup", NOW)
    habits(agent, crm, "refund", NOW, hours=[10], per_hour=1)
    return agent


def found(kind=None):
    rows = Anomaly.objects.all() if kind is None else Anomaly.objects.filter(kind=kind)
    return list(rows.order_by("id"))


def at(minutes, hour=THIS_HOUR):
    return hour + timedelta(minutes=minutes)


# --- Calls far above the usual rate ----------------------------------------------------------


def test_an_agents_calls_far_above_its_usual_rate_for_that_hour_are_an_anomaly(crm, seasoned):
    calls(24, seasoned, crm, "lookup", at(5), decided_by=DecidedBy.AUTO)
    assert anomalies.scan(NOW) == {AnomalyKind.CALL_RATE: 1}
    (anomaly,) = found(AnomalyKind.CALL_RATE)
    assert anomaly.agent == seasoned
    assert (anomaly.window_start, anomaly.window_end) == (THIS_HOUR, THIS_HOUR + timedelta(hours=1))
    assert anomaly.numbers == {"calls": 24, "usual": 2.0, "threshold": 20}
    assert anomaly.summary == (
        "support-bot made 24 calls in the hour from 14:00; usually 2.0 at that hour."
    )
    assert len(anomaly.calls()) == 24


def test_a_busy_hour_within_the_agents_habits_is_not_an_anomaly(crm, seasoned):
    calls(19, seasoned, crm, "lookup", at(5))  # above 3 x usual, below the 20-call floor
    busy = history.agent("batch-bot", crm)
    habits(busy, crm, "lookup", NOW, per_hour=10)
    calls(29, busy, crm, "lookup", at(5))  # usual 10: 29 is below 3 x 10
    assert anomalies.scan(NOW) == {}


def test_a_new_agent_is_not_judged_against_habits_it_does_not_have_yet(crm):
    newcomer = history.agent("new-bot", crm)
    habits(newcomer, crm, "lookup", NOW, days=2)  # two days of history: still learning
    calls(50, newcomer, crm, "lookup", at(5))
    call(newcomer, crm, "refund", at(6))
    assert anomalies.scan(NOW) == {}


# --- Bursts of refusals -------------------------------------------------------------------------


def test_a_burst_of_denials_blocks_and_invalid_arguments_is_an_anomaly(crm, seasoned):
    calls(2, seasoned, crm, "refund", at(21), Status.DENIED)
    call(seasoned, crm, "refund", at(22), Status.BLOCKED)
    calls(2, seasoned, crm, "refund", at(29), Status.BLOCKED, error_code="invalid_arguments")
    assert anomalies.scan(NOW) == {AnomalyKind.REFUSALS: 1}
    (anomaly,) = found()
    assert (anomaly.window_start, anomaly.window_end) == (at(20), at(30))
    assert anomaly.numbers == {
        "refused": 5, "denied": 2, "blocked": 3, "invalid_arguments": 2, "minutes": 10,
    }  # fmt: skip
    assert "support-bot had 5 calls refused in 10 minutes from 14:20" in anomaly.summary
    assert {c.status for c in anomaly.calls()} == {Status.DENIED, Status.BLOCKED}


def test_refusals_spread_out_or_few_are_not_a_burst(crm, seasoned):
    for minute in (1, 2, 11, 12, 21, 22, 25):  # 2, 2 and 3 in three ten-minute windows
        call(seasoned, crm, "refund", at(minute), Status.DENIED)
    calls(4, seasoned, crm, "refund", at(-30), Status.BLOCKED)  # 13:30, four in one window
    calls(6, seasoned, crm, "refund", at(-100), Status.DENIED)  # 12:50: before the scan looks
    assert anomalies.scan(NOW) == {}


# --- Tools never called before ------------------------------------------------------------------


def test_an_agent_calling_a_tool_it_never_called_is_an_anomaly_once(crm, seasoned):
    call(seasoned, crm, "export", at(-20))  # 13:40
    calls(3, seasoned, crm, "export", at(10))
    assert anomalies.scan(NOW) == {AnomalyKind.NEW_TOOL: 1}
    (anomaly,) = found()
    assert (anomaly.server_name, anomaly.tool_name, anomaly.numbers["calls"]) == (
        "crm", "export", 4,
    )  # fmt: skip
    assert anomaly.window_start == at(-60)
    assert anomaly.summary.startswith("support-bot on crm / export: called for the first time")

    # The next hour, and the one after: the same tool is now known, nothing new is stored.
    call(seasoned, crm, "export", at(70))
    assert anomalies.scan(NOW + timedelta(hours=1)) == {}
    assert anomalies.scan(NOW + timedelta(hours=2)) == {}
    assert len(found()) == 1


def test_known_tools_and_made_up_names_are_not_new_tools(crm, seasoned):
    calls(3, seasoned, crm, "lookup", at(5))
    call(seasoned, crm, "no_such_tool", at(6), Status.BLOCKED)  # refused: no fingerprint
    other = history.agent("other-bot", crm)
    habits(other, crm, "refund", NOW)
    call(other, crm, "refund", at(7))
    assert anomalies.scan(NOW) == {}


# --- Personal data ---------------------------------------------------------------------------


def with_email(n):
    return {"to": f"customer{n}@example.com", "body": "Your refund is on its way."}


def test_a_spike_of_personal_data_is_an_anomaly_for_the_agent_and_for_the_tool(crm, seasoned):
    for n in range(6):
        call(seasoned, crm, "refund", at(n), arguments=with_email(n))
    call(seasoned, crm, "refund", at(8), arguments={"order": "A-1001"})
    assert anomalies.scan(NOW) == {AnomalyKind.PERSONAL_DATA: 2}
    by_agent, by_tool = found()
    assert (by_agent.agent, by_agent.tool_name) == (seasoned, "")
    assert (by_tool.agent, by_tool.server_name, by_tool.tool_name) == (None, "crm", "refund")
    assert by_tool.numbers == {"calls": 6, "usual": 0.0, "threshold": 5}
    assert by_tool.summary == (
        "crm / refund: 6 calls with personal data in the hour from 14:00; usually 0.0."
    )
    assert len(by_tool.calls()) == 6  # the one without personal data is not behind it


def test_personal_data_as_usual_is_not_a_spike(crm, seasoned):
    habits(seasoned, crm, "refund", NOW, hours=[14], per_hour=4, arguments=with_email(0))
    for n in range(6):  # usual 4 at 14:00: 6 is below 3 x 4
        call(seasoned, crm, "refund", at(n), arguments=with_email(n))
    calls(4, history.agent("mail-bot", crm), crm, "lookup", at(3), arguments=with_email(9))
    assert anomalies.scan(NOW) == {}


# --- Outside usual hours ---------------------------------------------------------------------


def test_calls_outside_the_hours_an_agent_usually_works_are_an_anomaly(crm, seasoned):
    night = NOW.replace(hour=3, minute=30)
    call(seasoned, crm, "lookup", night.replace(minute=10))
    assert anomalies.scan(night) == {AnomalyKind.OFF_HOURS: 1}
    (anomaly,) = found()
    assert anomaly.numbers == {"calls": 1, "hour": 3, "usual_hours": list(range(9, 18))}
    assert "outside the hours it usually works (hours starting 09:00, 10:00" in anomaly.summary


def test_calls_in_usual_hours_are_not_off_hours_but_one_night_worked_is_no_habit(crm, seasoned):
    once = history.agent("once-bot", crm)
    habits(once, crm, "lookup", NOW)
    call(once, crm, "lookup", NOW.replace(hour=2, minute=5) - timedelta(days=2))  # one night
    call(once, crm, "lookup", NOW.replace(hour=2, minute=20))
    assert anomalies.scan(NOW.replace(hour=2, minute=30)) == {AnomalyKind.OFF_HOURS: 1}
    assert found()[0].agent == once  # one night worked is not a habit: still unusual
    call(seasoned, crm, "lookup", at(5))
    assert anomalies.scan(NOW) == {}


# --- Large arguments -------------------------------------------------------------------------


def test_arguments_far_larger_than_usual_for_the_tool_are_an_anomaly(crm, seasoned):
    habits(seasoned, crm, "export", NOW, hours=[10, 11], arguments={"query": "orders this week"})
    call(seasoned, crm, "export", at(5), arguments={"query": "x" * 5000})
    call(seasoned, crm, "export", at(6), arguments={"query": "orders today"})
    assert anomalies.scan(NOW) == {AnomalyKind.LARGE_ARGUMENTS: 1}
    (anomaly,) = found()
    assert anomaly.numbers["calls"] == 1
    assert anomaly.numbers["largest"] > 5000 and anomaly.numbers["usual"] < 40
    assert [c.arguments["query"][:3] for c in anomaly.calls()] == ["xxx"]


def test_large_arguments_are_not_an_anomaly_below_the_floor_or_without_a_baseline(crm, seasoned):
    habits(seasoned, crm, "export", NOW, hours=[10, 11], arguments={"q": "a"})
    call(seasoned, crm, "export", at(5), arguments={"q": "y" * 1500})  # 100 x usual, < 2 KB
    habits(seasoned, crm, "refund", NOW, days=2, hours=[10], arguments={"q": "a"})  # 4 calls
    call(seasoned, crm, "refund", at(6), arguments={"q": "z" * 9000})
    assert anomalies.scan(NOW) == {}


# --- Once, however often and however many scans run ----------------------------------------


def test_a_pattern_seen_by_many_scans_is_stored_and_announced_once(crm, seasoned, caplog):
    calls(22, seasoned, crm, "lookup", at(5))
    caplog.set_level(logging.WARNING, logger="approvals.anomalies")
    assert anomalies.scan(NOW) == {AnomalyKind.CALL_RATE: 1}
    calls(8, seasoned, crm, "lookup", at(20))
    assert anomalies.scan(NOW + timedelta(minutes=5)) == {}
    assert anomalies.scan(NOW + timedelta(minutes=40)) == {}  # judged as the previous hour
    (anomaly,) = found()
    assert anomaly.numbers["calls"] == 30  # the numbers follow the hour as it fills
    announced = [r for r in caplog.records if r.getMessage().startswith("Anomaly #")]
    assert len(announced) == 1


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_scans_running_at_once_store_each_anomaly_once(crm, seasoned):
    calls(25, seasoned, crm, "refund", at(1), Status.DENIED)
    results, barrier = [], threading.Barrier(4)

    def scan():
        barrier.wait()
        try:
            results.append(anomalies.scan(NOW))
        finally:
            connection.close()

    threads = [threading.Thread(target=scan) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 4
    kinds = sorted(a.kind for a in found())
    assert kinds == [AnomalyKind.CALL_RATE, AnomalyKind.REFUSALS]
    assert sum(sum(r.values()) for r in results) == 2  # each announced by one scan only


# --- The periodic task ---------------------------------------------------------------------------


def test_the_scan_is_a_beat_entry_that_expires_before_the_next_run():
    entry = django_settings.CELERY_BEAT_SCHEDULE["detect-anomalies"]
    assert entry["task"] == "approvals.tasks.detect_anomalies"
    period = entry["schedule"].total_seconds()
    assert period == django_settings.ANOMALY_SCAN_INTERVAL
    assert 0 < entry["options"]["expires"] < period


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_worker_runs_the_scan_and_the_anomaly_reaches_a_channel_once(
    celery_worker, crm, receiver
):
    hook = NotificationChannel.objects.create(
        name="security", kind="webhook", url=receiver.url("/hooks/toolgate"), secret="s" * 20,
        events=["anomaly"], allow_private_network=True, allow_http=True,
    )  # fmt: skip
    agent = history.agent("support-bot", crm)
    calls(6, agent, crm, "refund", history.this_hour(), Status.BLOCKED)
    detect_anomalies.delay()
    anomaly = wait_until(lambda: Anomaly.objects.filter(kind=AnomalyKind.REFUSALS).first(), 60)
    assert anomaly.agent == agent and anomaly.numbers["blocked"] == 6
    wait_until(lambda: receiver.requests, 60)
    [item] = json.loads(receiver.requests[0].body)["notifications"]
    assert item["event"] == "anomaly"
    assert item["title"].startswith("support-bot had 6 calls refused in 10 minutes")
    assert item["url"].endswith(f"/approvals/dashboard/anomalies/{anomaly.pk}/")

    detect_anomalies.delay()  # the same pattern, seen again: no second message
    wait_until(lambda: Anomaly.objects.get().last_seen_at > anomaly.last_seen_at, 60)
    assert Delivery.objects.filter(channel=hook).count() == 1
    assert Delivery.objects.get().status == "sent"
