"""The queue page in a real Chromium: log in, see a request posted through the API appear,
decide it by mouse and by keyboard, and two approvers racing on one request.

Screenshots go to var/screenshots/ (not committed) for a person to look at.
"""

import json
import urllib.request
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.contrib.auth.models import Group, User
from playwright.sync_api import expect

from approvals.models import Status, ToolCall
from integrations.models import Agent, ApprovalMode, McpServer
from tests.conftest import launch_chromium

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

SCREENSHOTS = Path(django_settings.VAR_DIR) / "screenshots"


@pytest.fixture(autouse=True)
def _playwright_and_django(monkeypatch, settings):
    # Playwright's sync API keeps an event loop in this thread; the ORM calls the tests make
    # between browser steps are still plain synchronous code.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    settings.QUEUE_POLL_SECONDS = 1


@pytest.fixture
def chromium(chromium_path, world, live_server):
    # Started after the database and MCP setup: while Playwright's sync API runs, this thread
    # has an event loop, and code that starts its own (the MCP client) can't run here.
    with launch_chromium(chromium_path) as browser:
        yield browser


@pytest.fixture
def world(mcp_demo_http):
    server = McpServer.objects.create(
        name="demo", url=mcp_demo_http.url, allow_private_network=True,
        approval_mode=ApprovalMode.ALWAYS_ASK, description="Demo tools",
    )  # fmt: skip
    assert server.sync_tools().ok
    return Agent.create_with_token("support-bot", [server])[1]


def approver(name):
    user = User.objects.create_user(name, password=f"pw-{name}-123")
    user.groups.add(Group.objects.get(name="Approvers"))
    return user


def log_in(chromium, live_server, name):
    page = chromium.new_context(viewport={"width": 1100, "height": 900}).new_page()
    page.goto(f"{live_server.url}/approvals/")
    expect(page).to_have_url(f"{live_server.url}/accounts/login/?next=/approvals/")
    page.get_by_label("Username").fill(name)
    page.get_by_label("Password").fill(f"pw-{name}-123")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Pending approvals")).to_be_visible()
    return page


def api(live_server, token, method, path, body=None):
    request = urllib.request.Request(  # noqa: S310 - a loopback URL
        f"{live_server.url}{path}",
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - a loopback URL
        return json.loads(response.read())


def post_call(live_server, token, tool="echo", arguments=None):
    body = {"server": "demo", "tool": tool, "arguments": arguments or {"text": "hello"}}
    return api(live_server, token, "POST", "/api/v1/tool-calls", body)


def test_an_approver_approves_a_request_and_the_agent_gets_the_result(
    chromium, live_server, world, celery_worker
):
    approver("alice")
    page = log_in(chromium, live_server, "alice")
    expect(page.get_by_text("Nothing waits for a decision.")).to_be_visible()

    call = post_call(live_server, world, arguments={"text": "hello, jane.doe@example.com"})
    card = page.locator(f'[data-call-id="{call["id"]}"]')
    expect(card).to_be_visible()  # appeared without a reload
    expect(card).to_contain_text("E-mail address")
    expect(card.get_by_role("region", name="Why this needs you")).to_contain_text(
        "Personal data in $.text (e-mail address)."
    )
    expect(card).to_contain_text("read-only")
    expect(page).to_have_title("(1) Pending approvals · Toolgate")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / "queue.png", full_page=True)

    card.get_by_role("button", name="Approve", exact=True).click()
    expect(card.locator(".outcome")).to_contain_text("Succeeded: hello", timeout=30_000)

    result = api(live_server, world, "GET", f"/api/v1/tool-calls/{call['id']}?wait=30")
    assert result["status"] == "succeeded"
    assert result["result"]["content"] == [{"type": "text", "text": "hello, jane.doe@example.com"}]
    assert result["decision"]["user"] == "alice"

    page.goto(f"{live_server.url}/approvals/history/")
    expect(page.locator(f'tr[data-call-id="{call["id"]}"]')).to_contain_text("Succeeded")
    page.screenshot(path=SCREENSHOTS / "history.png", full_page=True)


def test_a_keyboard_user_denies_with_a_note_that_reaches_the_agent(chromium, live_server, world):
    approver("bob")
    call = post_call(live_server, world, tool="delete_file", arguments={"path": "/etc/passwd"})
    page = log_in(chromium, live_server, "bob")
    card = page.locator(f'[data-call-id="{call["id"]}"]')
    expect(card).to_contain_text("destructive")

    card.get_by_label("Note (optional)").focus()
    page.keyboard.type("Never touch system files")
    page.keyboard.press("Tab")  # Approve
    page.keyboard.press("Tab")  # Deny
    page.keyboard.press("Enter")
    expect(card.locator(".outcome")).to_have_text("Denied.")

    result = api(live_server, world, "GET", f"/api/v1/tool-calls/{call['id']}")
    assert result["status"] == "denied"
    assert result["decision"]["note"] == "Never touch system files"
    assert result["decision"]["user"] == "bob"


def test_two_approvers_racing_end_in_one_decision(chromium, live_server, world):
    approver("alice")
    approver("bob")
    call = post_call(live_server, world)
    alice, bob = log_in(chromium, live_server, "alice"), log_in(chromium, live_server, "bob")
    alice_card = alice.locator(f'[data-call-id="{call["id"]}"]')
    bob_card = bob.locator(f'[data-call-id="{call["id"]}"]')

    alice_card.get_by_role("button", name="Approve", exact=True).click(no_wait_after=True)
    bob_card.get_by_role("button", name="Deny", exact=True).click(no_wait_after=True)

    expect(alice_card.locator(".outcome")).not_to_have_text("Sending…")
    expect(bob_card.locator(".outcome")).not_to_have_text("Sending…")
    stored = ToolCall.objects.get(pk=call["id"])
    assert stored.status in (Status.APPROVED, Status.RUNNING, Status.SUCCEEDED, Status.DENIED)
    who = stored.decided_by_user.username
    winner, loser = (alice_card, bob_card) if who == "alice" else (bob_card, alice_card)
    verb = "Denied" if stored.status == Status.DENIED else "Approved"
    other = "bob" if who == "alice" else "alice"
    expect(loser.locator(".outcome")).to_contain_text(f"{verb} by {who} at ")
    expect(winner.locator(".outcome")).not_to_contain_text(f"by {other}")


def test_a_request_decided_elsewhere_leaves_the_page(chromium, live_server, world):
    alice = approver("alice")
    call = post_call(live_server, world)
    page = log_in(chromium, live_server, "alice")
    card = page.locator(f'[data-call-id="{call["id"]}"]')
    expect(card).to_be_visible()
    ToolCall.objects.get(pk=call["id"]).deny(alice, "from the admin")
    expect(card.locator(".outcome")).to_contain_text("Denied by alice at ")
    expect(card.locator(".outcome")).to_contain_text("from the admin.")


def test_pages_run_under_the_strict_csp_without_violations(chromium, live_server, world):
    User.objects.create_superuser("root", password="pw-root-123")
    approver("carol")
    post_call(live_server, world)
    page = log_in(chromium, live_server, "carol")
    violations = []
    page.on("console", lambda message: violations.append(message.text))
    page.context.clear_cookies()
    page.goto(f"{live_server.url}/admin/login/?next=/admin/")
    page.get_by_label("Username").fill("root")
    page.get_by_label("Password").fill("pw-root-123")
    page.get_by_role("button", name="Log in").click()
    server = McpServer.objects.get(name="demo")
    for path in (
        "/admin/",
        "/admin/integrations/mcpserver/add/",
        f"/admin/integrations/mcpserver/{server.pk}/change/",
        "/admin/integrations/tool/",
        "/approvals/",
        "/approvals/history/",
    ):
        page.goto(f"{live_server.url}{path}")
        expect(page.locator("body")).to_be_visible()
    assert [v for v in violations if "Content Security Policy" in v] == []


def test_an_approver_corrects_the_arguments_before_approving(
    chromium, live_server, world, celery_worker
):
    approver("erin")
    call = post_call(live_server, world, arguments={"text": "helo wrold"})
    page = log_in(chromium, live_server, "erin")
    card = page.locator(f'[data-call-id="{call["id"]}"]')
    card.get_by_text("Edit the arguments before approving").click()
    editor = card.get_by_label("Arguments to run with (JSON)")
    expect(editor).to_have_value('{\n  "text": "helo wrold"\n}')

    editor.fill('{"text": "hello world"')  # a typo first: refused, the card stays
    card.get_by_role("button", name="Approve", exact=True).click()
    expect(card.locator(".outcome")).to_contain_text("not valid JSON")
    expect(card.get_by_role("button", name="Approve", exact=True)).to_be_enabled()
    assert ToolCall.objects.get(pk=call["id"]).status == Status.PENDING_APPROVAL

    editor.fill('{"text": "hello world"}')
    card.get_by_role("button", name="Approve", exact=True).click()
    expect(card.locator(".edited-diff")).to_contain_text('+  "text": "hello world"')
    expect(card.locator(".edited-diff")).to_contain_text('-  "text": "helo wrold"')
    expect(card.locator(".outcome")).to_contain_text("Succeeded: hello world", timeout=30_000)
    page.screenshot(path=SCREENSHOTS / "approve-with-edits.png", full_page=True)

    result = api(live_server, world, "GET", f"/api/v1/tool-calls/{call['id']}?wait=30")
    assert result["arguments"] == {"text": "hello world"}
    assert result["decision"]["edited"] is True
    assert result["result"]["content"] == [{"type": "text", "text": "hello world"}]
    page.goto(f"{live_server.url}/approvals/history/")
    row = page.locator(f'tr[data-call-id="{call["id"]}"]')
    row.get_by_text("Arguments edited by the approver").click()
    expect(row.locator("pre.diff")).to_contain_text('+  "text": "hello world"')
