"""Error pages (403, 404, 500, CSRF failure) in the site's layout: what happened, what to do,
and a way to log out; agents under /api/ get JSON instead."""

import pytest
from django.contrib.auth.models import Group, User
from django.test import Client
from playwright.sync_api import expect

from integrations.models import Agent
from tests.browser import log_in
from tests.conftest import launch_chromium

pytestmark = pytest.mark.django_db

LAYOUT = '<header class="top">'  # templates/base.html, with the site's stylesheet


@pytest.fixture
def staff_client():
    """Logged in, but not an approver: no permission to decide tool calls."""
    client = Client()
    client.force_login(User.objects.create_user("sam", password="pw-sam-12345", is_staff=True))
    return client


def test_a_user_who_is_not_an_approver_is_told_to_ask_for_the_group(staff_client):
    response = staff_client.get("/approvals/")
    assert response.status_code == 403
    html = response.content.decode()
    assert LAYOUT in html and "approvals/toolgate.css" in html
    assert "You are logged in as <strong>sam</strong>" in html
    assert "ask an admin to add you to the <strong>Approvers</strong> group" in html
    assert html.count('action="/accounts/logout/"') >= 2  # the header's and the page's
    assert 'name="csrfmiddlewaretoken"' in html  # the log-out buttons work (POST only)


def test_once_in_the_approvers_group_the_same_user_gets_the_queue(staff_client):
    Group.objects.get(name="Approvers").user_set.add(User.objects.get(username="sam"))
    assert staff_client.get("/approvals/").status_code == 200


def test_an_unknown_address_gets_a_page_saying_so(staff_client):
    response = staff_client.get("/approvals/no-such-page/")
    assert response.status_code == 404
    html = response.content.decode()
    assert LAYOUT in html
    assert "There is nothing at this address" in html and "/approvals/no-such-page/" in html
    assert 'href="/approvals/"' in html and 'action="/accounts/logout/"' in html


def test_an_unknown_tool_call_page_is_a_404_in_the_layout(staff_client):
    User.objects.filter(username="sam").update(is_superuser=True)
    response = staff_client.get("/approvals/999999/card")
    assert response.status_code == 404
    assert LAYOUT in response.content.decode()


@pytest.fixture
def failing_history(monkeypatch):
    def broken():
        raise RuntimeError("the database went away")

    monkeypatch.setattr("approvals.views._filter_choices", broken)
    client = Client(raise_request_exception=False)  # the response a browser would get
    client.force_login(User.objects.create_superuser("root", password="pw-root-123"))
    return client


def test_a_server_error_gets_a_page_in_the_layout(failing_history):
    response = failing_history.get("/approvals/history/")
    assert response.status_code == 500
    html = response.content.decode()
    assert LAYOUT in html and "Something went wrong on Toolgate's side" in html
    assert "the database went away" not in html  # details stay in the log
    assert 'action="/accounts/logout/"' in html


def test_the_500_page_still_renders_when_the_request_cannot_be_used(failing_history, monkeypatch):
    def unusable(*args, **kwargs):
        raise RuntimeError("the session store is down too")

    monkeypatch.setattr("config.views.render", unusable)
    response = failing_history.get("/approvals/history/")
    assert response.status_code == 500
    assert "Something went wrong on Toolgate's side" in response.content.decode()


def test_an_agent_gets_a_json_server_error(monkeypatch):
    def broken(agent):
        raise RuntimeError("boom")

    monkeypatch.setattr("approvals.api.tools_for_agent", broken)
    _, token = Agent.create_with_token("bot")
    client = Client(raise_request_exception=False)
    response = client.get("/api/v1/tools", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 500
    assert response.json() == {
        "error": {"code": "internal", "message": "Internal error; see the server log."}
    }


def test_a_form_without_its_csrf_token_gets_a_page_saying_what_to_do():
    client = Client(enforce_csrf_checks=True)
    client.force_login(User.objects.create_user("sam", password="pw-sam-12345"))
    response = client.post("/accounts/logout/")
    assert response.status_code == 403
    html = response.content.decode()
    assert LAYOUT in html and "Your form could not be sent" in html
    assert "reload the page and send the form again" in html
    # The page carries a fresh token, so its own log-out button works.
    token = response.cookies["csrftoken"].value
    assert client.post("/accounts/logout/", {"csrfmiddlewaretoken": token}).status_code == 302


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_in_a_browser_the_403_page_is_styled_and_logs_out(chromium_path, live_server, monkeypatch):
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    User.objects.create_user("sam", password="pw-sam-12345")
    with launch_chromium(chromium_path) as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        log_in(page, f"{live_server.url}/approvals/", "sam", "pw-sam-12345")
        heading = page.get_by_role("heading", name="You don't have access to this page")
        expect(heading).to_be_visible()
        expect(page.locator(".error-page")).to_contain_text("Approvers")
        # Styled: the site's stylesheet applies (the page's card has the layout's border).
        radius = page.locator(".error-page").evaluate("e => getComputedStyle(e).borderRadius")
        assert radius == "8px"
        page.locator(".error-page").get_by_role("button", name="Log out").click()
        expect(page).to_have_url(f"{live_server.url}/accounts/login/")
        page.goto(f"{live_server.url}/nowhere/")
        expect(page.get_by_role("heading", name="There is nothing at this address")).to_be_visible()


# `make run` runs with DEBUG on: Django's technical pages (URL patterns, traceback, settings)
# must not replace the site's own.
@pytest.fixture
def debug_on(settings):
    settings.DEBUG = True
    settings.SECRET_TOKEN_FOR_TEST = "must-not-show-123"  # a setting the technical 500 would list


def test_with_debug_on_an_unknown_address_gets_the_sites_404(staff_client, debug_on):
    response = staff_client.get("/approvals/no-such-page/")
    assert response.status_code == 404
    html = response.content.decode()
    assert LAYOUT in html and "There is nothing at this address" in html
    assert "URLconf" not in html and "DEBUG = True" not in html


def test_with_debug_on_a_missing_object_gets_the_sites_404(staff_client, debug_on):
    User.objects.filter(username="sam").update(is_superuser=True)
    response = staff_client.get("/approvals/999999/card")
    assert response.status_code == 404
    assert LAYOUT in response.content.decode()
    assert "Raised by:" not in response.content.decode()


def test_with_debug_on_a_server_error_gets_the_sites_500_and_the_log_the_traceback(
    failing_history, debug_on, caplog
):
    response = failing_history.get("/approvals/history/")
    assert response.status_code == 500
    html = response.content.decode()
    assert LAYOUT in html and "Something went wrong on Toolgate's side" in html
    assert "the database went away" not in html and "Traceback" not in html
    assert "SECRET_TOKEN_FOR_TEST" not in html and "INSTALLED_APPS" not in html
    assert "the database went away" in caplog.text  # the developer still gets the traceback


def test_technical_pages_come_back_when_asked_for(staff_client, debug_on, settings):
    settings.TECHNICAL_ERROR_PAGES = True
    response = staff_client.get("/approvals/no-such-page/")
    assert response.status_code == 404 and "URLconf" in response.content.decode()


def test_an_agent_still_gets_json_with_debug_on(debug_on):
    response = Client().get("/api/v1/nope")
    assert response.status_code == 404 and response.json()["error"]["code"]


def test_with_debug_on_the_async_stack_gets_the_sites_404_too(debug_on):
    from asgiref.sync import async_to_sync
    from django.test import AsyncClient

    response = async_to_sync(AsyncClient().get)("/approvals/no-such-page/")
    assert response.status_code == 404
    assert LAYOUT in response.content.decode() and "URLconf" not in response.content.decode()
