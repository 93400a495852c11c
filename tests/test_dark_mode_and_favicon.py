"""The approvers' pages follow the system's dark mode, as the admin does; every page has a
favicon."""

import pytest
from django.contrib.auth.models import User
from playwright.sync_api import expect

from tests.browser import log_in
from tests.conftest import launch_chromium

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def luminance(rgb):
    """0 (black) to 255 (white), from a computed "rgb(r, g, b)"."""
    r, g, b = (int(part) for part in rgb[rgb.index("(") + 1 : rgb.index(")")].split(",")[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


@pytest.fixture
def browser(chromium_path, live_server, monkeypatch):
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    User.objects.create_superuser("root", password="pw-root-123")
    with launch_chromium(chromium_path) as browser:
        yield browser


def logged_in(browser, live_server, scheme):
    page = browser.new_page(color_scheme=scheme)
    log_in(page, f"{live_server.url}/accounts/login/", "root", "pw-root-123")
    expect(page.get_by_role("heading", name="Pending approvals")).to_be_visible()
    return page


def colours(page, selector):
    return page.locator(selector).first.evaluate(
        "e => [getComputedStyle(e).backgroundColor, getComputedStyle(e).color]"
    )


@pytest.mark.parametrize("path", ["/approvals/", "/approvals/history/", "/nowhere/"])
def test_the_approvers_pages_follow_the_system_dark_mode(browser, live_server, path):
    light, dark = (logged_in(browser, live_server, scheme) for scheme in ("light", "dark"))
    for page in (light, dark):
        page.goto(f"{live_server.url}{path}")
    light_bg, light_ink = colours(light, "body")
    dark_bg, dark_ink = colours(dark, "body")
    assert luminance(light_bg) > 200 and luminance(light_ink) < 80
    assert luminance(dark_bg) < 50 and luminance(dark_ink) > 180
    # Form controls too (not the browser's white defaults on a dark page).
    if path != "/nowhere/":
        field_bg, _ = colours(dark, "select")
        assert luminance(field_bg) < 80


def test_the_admin_follows_it_too(browser, live_server):
    page = logged_in(browser, live_server, "dark")
    page.goto(f"{live_server.url}/admin/")
    background, _ = colours(page, "body")
    assert luminance(background) < 50


@pytest.mark.parametrize("path", ["/approvals/", "/admin/", "/accounts/login/"])
def test_every_page_has_a_favicon(browser, live_server, path):
    page = logged_in(browser, live_server, "light")
    page.goto(f"{live_server.url}{path}")
    href = page.locator('link[rel="icon"]').get_attribute("href")
    icon = page.request.get(f"{live_server.url}{href}")
    assert icon.status == 200 and icon.headers["content-type"].startswith("image/svg+xml")
    legacy = page.request.get(f"{live_server.url}/favicon.ico")  # browsers that ask anyway
    assert legacy.status == 200 and legacy.headers["content-type"].startswith("image/svg+xml")
