"""The dashboard in a real Chromium: an approver reaches it from the queue, reads the chart and
its table, opens the calls behind an anomaly and acknowledges it; no CSP violation, light and
dark. Screenshots go to var/screenshots/ (not committed) for a person to look at."""

from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.contrib.auth.models import Group, User
from playwright.sync_api import expect

from approvals import anomalies
from approvals.models import Anomaly, DecidedBy, Status
from tests import history
from tests.conftest import launch_chromium

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

SCREENSHOTS = Path(django_settings.VAR_DIR) / "screenshots"


@pytest.fixture(autouse=True)
def _playwright_and_django(monkeypatch):
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


@pytest.fixture
def world():
    """A day of work for two agents, then a burst of refusals an hour ago, found by a scan."""
    crm = history.server_with_tools("crm", ("lookup", "refund", "export"))
    mail = history.server_with_tools("mail", ("send",))
    bot, ops = history.agent("support-bot", crm, mail), history.agent("ops-bot", crm)
    start = history.this_hour() - timedelta(hours=23)
    for hour in range(24):
        at = start + timedelta(hours=hour, minutes=7)
        history.calls(2 + hour % 5, bot, crm, "lookup", at, decided_by=DecidedBy.AUTO)
        history.calls(
            hour % 3, bot, crm, "refund", at, Status.SUCCEEDED, decision_seconds=20 + hour
        )
        history.calls(hour % 2, ops, mail, "send", at, Status.EXPIRED)
        if hour % 6 == 0:
            history.call(ops, crm, "refund", at, Status.DENIED, decision_seconds=90)
            history.call(bot, crm, "export", at, Status.FAILED, error_code="timeout")
    burst = history.this_hour() - timedelta(minutes=50)
    history.calls(6, ops, crm, "refund", burst, Status.BLOCKED, error_code="invalid_arguments")
    history.call(bot, mail, "send", history.this_hour(), Status.PENDING_APPROVAL)
    anomalies.scan()
    user = User.objects.create_user("alice", password="pw-alice-123")
    user.groups.add(Group.objects.get(name="Approvers"))
    return Anomaly.objects.get(kind="refusals")


@pytest.fixture
def chromium(chromium_path, world, live_server):
    with launch_chromium(chromium_path) as browser:
        yield browser


def log_in(browser, live_server, scheme="light"):
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, color_scheme=scheme)
    page = context.new_page()
    violations = []
    page.on(
        "console", lambda m: violations.append(m.text) if "Content Security" in m.text else None
    )
    page.goto(f"{live_server.url}/accounts/login/")
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill("pw-alice-123")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Pending approvals")).to_be_visible()
    return page, violations


def test_an_approver_reads_the_dashboard_and_acknowledges_an_anomaly(chromium, live_server, world):
    page, violations = log_in(chromium, live_server)
    page.get_by_role("link", name="Dashboard").click()
    expect(page.get_by_role("heading", name="Dashboard", exact=True)).to_be_visible()

    chart = page.get_by_role("img", name="Calls per hour by outcome")
    expect(chart).to_be_visible()
    assert chart.locator("rect.bar").count() > 24  # stacked: several segments in some hours
    legend = page.get_by_role("table", name="Calls by outcome")
    expect(legend.locator('[data-outcome="expired"]')).to_contain_text("Expired")
    expect(page.locator("#tile-pending")).to_contain_text("1")
    expect(page.locator("#tools-table")).to_contain_text("crm / lookup")
    expect(page.locator("#servers-table")).to_contain_text("crm")
    anomaly = page.locator(f'[data-anomaly-id="{world.pk}"]')
    expect(anomaly).to_contain_text("ops-bot had 6 calls refused in 10 minutes")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / "dashboard.png", full_page=True)

    anomaly.get_by_role("link", name="The calls behind it").click()
    expect(page.locator("tr[data-call-id]")).to_have_count(6)
    page.get_by_role("button", name="Acknowledge").click()
    expect(page.get_by_text(f"Anomaly #{world.pk} acknowledged.")).to_be_visible()
    expect(page.locator(f'[data-anomaly-id="{world.pk}"]')).to_contain_text("Acknowledged by alice")
    world.refresh_from_db()
    assert world.acknowledged_by.username == "alice" and world.acknowledged_at
    assert violations == []


def test_the_dashboard_in_dark_mode_for_the_last_week(chromium, live_server, world):
    page, violations = log_in(chromium, live_server, scheme="dark")
    page.goto(f"{live_server.url}/approvals/dashboard/?period=7d&agent=ops-bot")
    expect(page.get_by_role("img", name="Calls per hour by outcome")).to_be_visible()
    expect(page.locator("select[name=agent]")).to_have_value("ops-bot")
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(21, 26, 35)"
    page.screenshot(path=SCREENSHOTS / "dashboard-dark.png", full_page=True)
    assert violations == []
