"""The page of one call, `/approvals/<id>/`: the target of every notification link. It shows
the card while the call waits and the outcome after; opening it decides nothing."""

import pytest
from django.contrib.auth.models import Group, User
from django.test import Client
from playwright.sync_api import expect

from approvals.models import Status, ToolCall
from tests.conftest import launch_chromium
from tests.test_notifications import make_world, pending_call

pytestmark = pytest.mark.django_db


@pytest.fixture
def call():
    server, tool, agent, _ = make_world()
    return pending_call(server, tool, agent, arguments={"to": "jane@example.com"})


def test_anonymous_users_log_in_and_come_back_to_the_call(client, call):
    response = client.get(f"/approvals/{call.pk}/")
    assert response.status_code == 302
    assert response["Location"] == f"/accounts/login/?next=/approvals/{call.pk}/"


def test_users_without_the_approver_permission_get_403(client, call):
    client.force_login(User.objects.create_user("bob"))
    assert client.get(f"/approvals/{call.pk}/").status_code == 403


def test_an_unknown_call_is_404(client, approver):
    assert client.get("/approvals/999999/").status_code == 404


def test_a_pending_call_shows_its_card_and_opening_it_decides_nothing(client, approver, call):
    html = client.get(f"/approvals/{call.pk}/").content.decode()
    assert f'data-call-id="{call.pk}"' in html
    assert 'value="approve"' in html and 'value="deny"' in html
    assert "jane@example.com" in html  # the approver sees the full arguments
    assert f'name="next" value="/approvals/{call.pk}/"' in html
    assert ToolCall.objects.get(pk=call.pk).status == Status.PENDING_APPROVAL
    assert client.get(f"/approvals/{call.pk}/decide").status_code == 405


def test_deciding_needs_a_csrf_token(approver, call):
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(approver)
    response = strict.post(f"/approvals/{call.pk}/decide", {"decision": "approve"})
    assert response.status_code == 403
    assert ToolCall.objects.get(pk=call.pk).status == Status.PENDING_APPROVAL


def test_a_decision_on_the_page_comes_back_to_it_with_the_outcome(client, approver, call):
    response = client.post(
        f"/approvals/{call.pk}/decide",
        {"decision": "deny", "note": "not today", "next": f"/approvals/{call.pk}/"},
        follow=True,
    )
    assert response.redirect_chain == [(f"/approvals/{call.pk}/", 302)]
    html = response.content.decode()
    assert f"#{call.pk}: Denied." in html
    assert '<h2 id="outcome-title">Denied</h2>' in html
    assert "not today" in html
    assert 'value="approve"' not in html
    assert ToolCall.objects.get(pk=call.pk).status == Status.DENIED


def test_a_next_address_off_the_site_is_ignored(client, approver, call):
    response = client.post(
        f"/approvals/{call.pk}/decide", {"decision": "deny", "next": "https://evil.example/"}
    )
    assert response["Location"] == "/approvals/"


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_an_approver_follows_a_notification_link_logs_in_and_denies(
    chromium_path, live_server, monkeypatch
):
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    server, tool, agent, _ = make_world()
    call = pending_call(server, tool, agent)
    User.objects.create_user("alice", password="pw-alice-123").groups.add(
        Group.objects.get(name="Approvers")
    )
    with launch_chromium(chromium_path) as browser:
        page = browser.new_page()
        page.goto(f"{live_server.url}/approvals/{call.pk}/")
        page.get_by_label("Username").fill("alice")
        page.get_by_label("Password").fill("pw-alice-123")
        page.get_by_role("button", name="Log in").click()
        expect(page).to_have_url(f"{live_server.url}/approvals/{call.pk}/")
        expect(page.get_by_text("support-bot")).to_be_visible()
        page.get_by_role("button", name="Deny").click()
        expect(page).to_have_url(f"{live_server.url}/approvals/{call.pk}/")
        expect(page.get_by_role("heading", name="Denied")).to_be_visible()
    assert ToolCall.objects.get(pk=call.pk).status == Status.DENIED
