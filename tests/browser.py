"""Helpers for the tests that drive a real Chromium (started with `conftest.launch_chromium`)."""


def log_in(page, url, username, password):
    """Open `url` (a page behind a login, or a login page itself) and log in with the form."""
    page.goto(url)
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
