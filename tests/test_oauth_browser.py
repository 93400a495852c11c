"""Connecting an OAuth 2.1 server in a real Chromium: add it in the admin, consent at the
authorization server, come back to the server's page, and watch the worker sync its tools
with the new token."""

from pathlib import Path

import pytest
from django.conf import settings as django_settings
from playwright.sync_api import expect

from integrations.models import McpServer
from integrations.oauth import OAuthCredential
from tests.conftest import launch_chromium, wait_until
from tests.oauth_servers import READ, start_oauth_world

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

SCREENSHOTS = Path(django_settings.VAR_DIR) / "screenshots"


@pytest.fixture(autouse=True)
def _playwright_and_django(monkeypatch, settings, live_server):
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    settings.SITE_URL = live_server.url  # the redirect URI the authorization server gets


@pytest.fixture
def world(mcp_factory):
    return start_oauth_world(mcp_factory)


@pytest.fixture
def admin_page(world, chromium_path, live_server, celery_worker, django_user_model):
    django_user_model.objects.create_superuser("root", password="pw-root-123")
    with launch_chromium(chromium_path) as browser:
        page = browser.new_page(viewport={"width": 1200, "height": 1400})
        page.goto(f"{live_server.url}/admin/login/?next=/admin/")
        page.get_by_label("Username").fill("root")
        page.get_by_label("Password").fill("pw-root-123")
        page.get_by_role("button", name="Log in").click()
        yield page


def test_an_admin_connects_a_server_with_one_consent(admin_page, world, live_server):
    auth, mcp = world
    page = admin_page
    page.goto(f"{live_server.url}/admin/integrations/mcpserver/add/")
    page.get_by_label("Name").fill("files")
    page.get_by_label("Server URL").fill(mcp.url)
    expect(page.get_by_label("Client ID (optional)")).to_be_hidden()
    page.get_by_label("OAuth 2.1").check()
    expect(page.get_by_label("Client ID (optional)")).to_be_visible()
    expect(page.get_by_label("Secret token (optional)")).to_be_hidden()
    page.get_by_label("Allow private network").check()
    page.get_by_label("Allow plain HTTP").check()
    page.get_by_role("button", name="Save", exact=True).click()

    # The authorization server's consent page, then back to the server's page.
    expect(page.locator("#scopes")).to_have_text(READ)
    assert page.url.startswith(f"{auth.issuer}/consent")
    page.get_by_role("button", name="Approve").click()
    server = McpServer.objects.get(name="files")
    expect(page).to_have_url(f"{live_server.url}/admin/integrations/mcpserver/{server.pk}/change/")
    # The page is not reloaded when the worker's sync ends (static/integrations/sync-status.js
    # updates the sync fields and the tools table in place).
    expect(page.locator("#oauth-status")).to_contain_text("Connected")
    expect(page.locator("#oauth-status")).to_contain_text("by root")
    expect(page.locator("#oauth-status")).to_contain_text(f"Scopes granted: {READ}")
    try:
        expect(page.locator("#sync-status")).to_have_text("OK", timeout=30_000)
    except AssertionError:
        raise AssertionError(McpServer.objects.get(pk=server.pk).last_error) from None
    expect(page.get_by_text("delete_file", exact=True)).to_be_visible()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "oauth-connected.png"), full_page=True)

    credential = OAuthCredential.objects.get(server=server)
    assert mcp.tokens_seen[-1] == credential.access_token  # the worker used the new token
    html = page.content()
    for secret in auth.all_secrets():
        assert secret not in html

    # Reconnect goes the same way, from the button in the Authentication section.
    page.get_by_role("button", name="Reconnect").click()
    page.get_by_role("button", name="Approve").click()
    expect(page).to_have_url(f"{live_server.url}/admin/integrations/mcpserver/{server.pk}/change/")
    expect(page.locator("#oauth-status")).to_contain_text("Connected")
    assert OAuthCredential.objects.get(server=server).version > credential.version


def test_an_admin_reconnects_a_server_whose_grant_was_revoked(admin_page, world, live_server):
    auth, mcp = world
    page = admin_page
    page.goto(f"{live_server.url}/admin/integrations/mcpserver/add/")
    page.get_by_label("Name").fill("files")
    page.get_by_label("Server URL").fill(mcp.url)
    page.get_by_label("OAuth 2.1").check()
    page.get_by_label("Allow private network").check()
    page.get_by_label("Allow plain HTTP").check()
    page.get_by_role("button", name="Save", exact=True).click()
    page.get_by_role("button", name="Approve").click()
    server = McpServer.objects.get(name="files")
    server_page = f"{live_server.url}/admin/integrations/mcpserver/{server.pk}/change/"
    expect(page.locator("#sync-status")).to_have_text("OK", timeout=30_000)
    first = OAuthCredential.objects.get(server=server)

    # The user revokes Toolgate's access at the provider; the next sync's refresh is refused.
    auth.revoke_everything()
    page.goto(f"{live_server.url}/admin/integrations/mcpserver/")
    page.locator(f'input[name="_selected_action"][value="{server.pk}"]').check()
    page.locator('select[name="action"]').select_option("sync_now")
    page.get_by_role("button", name="Go").click()
    expect(page.get_by_text("Sync queued for 1 server(s).")).to_be_visible()
    # The list shows the state as it was when rendered: look again once the worker gave up.
    wait_until(lambda: OAuthCredential.objects.get(server=server).needs_reconnect, 30)
    page.reload()
    expect(page.locator("#result_list")).to_contain_text("Needs reconnecting")

    page.goto(server_page)
    status = page.locator("#oauth-status")
    expect(status).to_contain_text("Needs reconnecting: The token endpoint refused")
    expect(page.locator("#sync-status")).not_to_have_text("OK")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "oauth-needs-reconnecting.png"), full_page=True)

    status.get_by_role("button", name="Reconnect").click()
    expect(page.locator("#scopes")).to_have_text(READ)
    page.get_by_role("button", name="Approve").click()
    expect(page).to_have_url(server_page)
    expect(page.get_by_text("Connected files. Its tools are being synced.")).to_be_visible()
    expect(status).to_contain_text("Connected")
    expect(status).not_to_contain_text("Needs reconnecting")
    expect(page.locator("#sync-status")).to_have_text("OK", timeout=30_000)

    credential = OAuthCredential.objects.get(server=server)
    assert credential.is_connected and credential.version > first.version
    assert mcp.tokens_seen[-1] == credential.access_token  # the worker synced with the new one
    html = page.content()
    for secret in auth.all_secrets():
        assert secret not in html
