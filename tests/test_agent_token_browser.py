"""Creating an agent in the admin, in a real Chromium: the token is shown once on a page of
its own (post/redirect/get: reloading it neither resubmits the form nor shows the token
again), with a copy button and the URLs the agent connects to."""

import pytest
from playwright.sync_api import expect

from integrations.models import Agent, McpServer
from tests.browser import log_in
from tests.conftest import launch_chromium

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def page(chromium_path, live_server, django_user_model, monkeypatch, settings):
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    settings.SITE_URL = live_server.url
    django_user_model.objects.create_superuser("root", password="pw-root-123")
    McpServer.objects.create(name="shop", url="https://mcp.example.com/mcp")
    with launch_chromium(chromium_path) as browser:
        context = browser.new_context()
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live_server.url)
        page = context.new_page()
        log_in(page, f"{live_server.url}/admin/login/", "root", "pw-root-123")
        yield page


def test_the_token_is_shown_once_copied_with_a_click_and_gone_on_reload(page, live_server):
    page.goto(f"{live_server.url}/admin/integrations/agent/add/")
    page.get_by_label("Name").fill("support-bot")
    page.locator("#id_servers_from option", has_text="shop").dblclick()  # filter_horizontal
    page.get_by_role("button", name="Save", exact=True).click()

    agent = Agent.objects.get(name="support-bot")
    expect(page).to_have_url(f"{live_server.url}/admin/integrations/agent/{agent.pk}/token/")
    token = page.get_by_label("API token").input_value()
    assert Agent.authenticate(token) == agent
    expect(page.locator(".tg-urls")).to_contain_text(f"{live_server.url}/api/v1/")
    expect(page.locator(".tg-urls")).to_contain_text(f"{live_server.url}/mcp/")
    expect(page.locator(".tg-urls")).to_contain_text(f"{live_server.url}/mcp/shop/")

    page.get_by_role("button", name="Copy", exact=True).click()
    expect(page.locator(".tg-copied")).to_have_text("Copied.")
    assert page.evaluate("navigator.clipboard.readText()") == token

    page.reload()  # no resubmission prompt: this page was fetched with GET
    expect(page.locator(".errornote")).to_contain_text("was shown once")
    assert token not in page.content()
    assert Agent.objects.count() == 1
    assert Agent.authenticate(token) == agent  # the reload didn't rotate it either
