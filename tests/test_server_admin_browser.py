"""Adding an MCP server in the admin, in a real Chromium: the page follows the sync the
worker runs and then shows the tools, or the error, in place: it never reloads, so nothing the
admin typed meanwhile is lost. Refused forms keep the URL and name the option to tick."""

import re
import threading

import anyio
import pytest
from playwright.sync_api import expect

from integrations.models import McpServer, Tool
from tests.browser import log_in
from tests.conftest import launch_chromium
from tests.mcp_servers import PROTECTED_TOKEN, MutableServer, mutable_server, protected_server

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _playwright_and_django(monkeypatch):
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


@pytest.fixture
def admin_page(chromium_path, live_server, celery_worker, django_user_model):
    django_user_model.objects.create_superuser("root", password="pw-root-123")
    with launch_chromium(chromium_path) as browser:
        page = browser.new_page()
        log_in(page, f"{live_server.url}/admin/login/?next=/admin/", "root", "pw-root-123")
        yield page


def add_server(page, live_server, url, token=""):
    page.goto(f"{live_server.url}/admin/integrations/mcpserver/add/")
    page.get_by_label("Name").fill("crm")
    page.get_by_label("Server URL").fill(url)
    page.get_by_label("Secret token (optional)").fill(token)
    page.get_by_label("Allow private network").check()
    page.get_by_label("Allow plain HTTP").check()
    page.get_by_role("button", name="Save and continue editing").click()


class GatedServer(MutableServer):
    """Answers `tools/list` only once the test opens the gate, so the test can act while the
    worker's sync is under way."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()

    async def _list_tools(self, ctx, params):
        while not self.gate.is_set():
            await anyio.sleep(0.05)
        return await super()._list_tools(ctx, params)


def mark_page(page):
    """A flag that only survives as long as the page is not reloaded."""
    page.evaluate("window.toolgateNotReloaded = true")


def still_the_same_page(page):
    return page.evaluate("window.toolgateNotReloaded === true")


def test_the_change_page_follows_the_sync_and_shows_the_tools(admin_page, live_server, mcp_factory):
    running = mcp_factory(protected_server())
    add_server(admin_page, live_server, running.url, PROTECTED_TOKEN + "-but-wrong")
    # The page polls while the worker syncs, then shows the outcome in place.
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


def test_a_finished_sync_updates_the_page_in_place_and_keeps_unsaved_edits(
    admin_page, live_server, mcp_factory
):
    gated = GatedServer()
    gated.add_tool("lookup", description="Look something up.")
    gated.add_tool("delete_file", description="Delete a file.")
    running = mcp_factory(gated)
    page = admin_page
    add_server(page, live_server, running.url)
    saved = page.locator(".messagelist", has_text="was added successfully")
    expect(saved).to_be_visible()
    expect(page.locator("#sync-status")).to_have_text(re.compile("queued|Syncing"))
    expect(page.locator("#server-tools")).to_contain_text("appear here when the sync ends")
    mark_page(page)
    page.get_by_label("Description").fill("Typed while the sync runs")

    gated.gate.set()
    expect(page.locator("#sync-status")).to_have_text("OK", timeout=30_000)
    expect(page.locator("#server-tools").get_by_text("delete_file", exact=True)).to_be_visible()
    assert still_the_same_page(page)
    expect(page.get_by_label("Description")).to_have_value("Typed while the sync runs")
    expect(saved).to_be_visible()
    last_synced = page.locator(".field-last_synced_at .readonly")
    expect(last_synced).to_have_text(re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$"))

    # The next sync swaps the table again: a setting changed meanwhile and not saved survives.
    gated.gate.clear()
    gated.add_tool("send_report", description="Send the weekly report.")
    page.get_by_role("button", name="Save and continue editing").click()
    expect(page.locator(".messagelist", has_text="was changed successfully")).to_be_visible()
    mark_page(page)
    row = page.locator("#server-tools tr", has_text="delete_file")
    row.locator("select").select_option(label="Disabled")
    gated.gate.set()
    expect(page.locator("#server-tools").get_by_text("send_report", exact=True)).to_be_visible(
        timeout=30_000
    )
    assert still_the_same_page(page)
    expect(row.locator("select")).to_have_value("disabled")
    page.get_by_role("button", name="Save", exact=True).click()
    expect(page.locator(".messagelist", has_text="was changed successfully")).to_be_visible()
    server = McpServer.objects.get()
    assert server.description == "Typed while the sync runs"
    assert Tool.objects.get(name="delete_file").approval == "disabled"
    assert server.tools.count() == 3


def test_a_refused_server_keeps_the_url_and_says_which_option_to_tick(
    admin_page, live_server, mcp_factory
):
    running = mcp_factory(mutable_server())
    page = admin_page
    page.goto(f"{live_server.url}/admin/integrations/mcpserver/add/")
    page.get_by_label("Name").fill("crm")
    page.get_by_label("Server URL").fill(running.url)  # http://127.0.0.1:…
    page.get_by_label("Secret token (optional)").fill("tok-123")
    page.get_by_role("button", name="Save and continue editing").click()

    # Both problems at once, each naming the box that allows it; the URL is still there.
    errors = page.locator(".field-url .errorlist")
    expect(errors).to_contain_text("tick “Allow plain HTTP”")
    expect(errors).to_contain_text("127.0.0.1 is an address that is not public (loopback)")
    expect(errors).to_contain_text("tick “Allow private network”")
    expect(page.get_by_label("Server URL")).to_have_value(running.url)  # no retyping
    expect(page.locator(".field-secret_token")).to_contain_text("Not kept after an error")
    assert not McpServer.objects.exists()  # found when saving, not by the sync

    page.get_by_label("Allow plain HTTP").check()
    page.get_by_label("Secret token (optional)").fill("tok-123")
    page.get_by_role("button", name="Save and continue editing").click()
    expect(errors).not_to_contain_text("Allow plain HTTP")
    expect(errors).to_contain_text("tick “Allow private network”")
    page.get_by_label("Allow private network").check()
    page.get_by_label("Secret token (optional)").fill("tok-123")
    page.get_by_role("button", name="Save and continue editing").click()
    expect(page.locator("#sync-status")).to_have_text("OK", timeout=30_000)
    expect(page.locator("#server-tools").get_by_text("lookup", exact=True)).to_be_visible()
    server = McpServer.objects.get()
    assert (server.url, server.secret_token) == (running.url, "tok-123")
