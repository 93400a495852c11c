"""Adding an MCP server in the admin, in a real Chromium: the page follows the sync the
worker runs and then shows the tools, or the error."""

import pytest
from playwright.sync_api import expect

from integrations.models import McpServer
from tests.conftest import launch_chromium
from tests.mcp_servers import PROTECTED_TOKEN, protected_server

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _playwright_and_django(monkeypatch):
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


@pytest.fixture
def admin_page(chromium_path, live_server, celery_worker, django_user_model):
    django_user_model.objects.create_superuser("root", password="pw-root-123")
    with launch_chromium(chromium_path) as browser:
        page = browser.new_page()
        page.goto(f"{live_server.url}/admin/login/?next=/admin/")
        page.get_by_label("Username").fill("root")
        page.get_by_label("Password").fill("pw-root-123")
        page.get_by_role("button", name="Log in").click()
        yield page


def add_server(page, live_server, url, token=""):
    page.goto(f"{live_server.url}/admin/integrations/mcpserver/add/")
    page.get_by_label("Name").fill("crm")
    page.get_by_label("Server URL").fill(url)
    page.get_by_label("Secret token (optional)").fill(token)
    page.get_by_label("Allow private network").check()
    page.get_by_label("Allow plain HTTP").check()
    page.get_by_role("button", name="Save and continue editing").click()


def test_the_change_page_follows_the_sync_and_shows_the_tools(admin_page, live_server, mcp_factory):
    running = mcp_factory(protected_server())
    add_server(admin_page, live_server, running.url, PROTECTED_TOKEN + "-but-wrong")
    # The page polls while the worker syncs, then reloads itself with the outcome.
    expect(admin_page.locator("#sync-status")).to_have_text("Error", timeout=30_000)
    expect(admin_page.locator(".field-last_error")).to_contain_text("HTTP 401")

    admin_page.get_by_label("Secret token (optional)").fill(PROTECTED_TOKEN)
    admin_page.get_by_label("HTTP headers (optional)").fill("X-Api-Key: k-123")
    admin_page.get_by_role("button", name="Save and continue editing").click()
    expect(admin_page.locator("#sync-status")).to_have_text("OK", timeout=30_000)
    expect(admin_page.get_by_text("delete_file", exact=True)).to_be_visible()
    expect(admin_page.get_by_text("destructive", exact=True)).to_be_visible()
    assert McpServer.objects.get().tools.count() == 5
    page_html = admin_page.content()
    assert PROTECTED_TOKEN not in page_html and "k-123" not in page_html
