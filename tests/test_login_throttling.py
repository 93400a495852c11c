"""Login throttling with django-axes on both login pages (issue 9 item 7): 40 wrong passwords
in 11 s used to go through, with no lockout."""

from datetime import timedelta

import pytest
from axes.models import AccessAttempt
from django.utils import timezone

from tests.test_settings import start

pytestmark = pytest.mark.django_db

PAGES = ["/accounts/login/", "/admin/login/"]
PASSWORD = "pw-right-123"


@pytest.fixture
def staff(django_user_model):
    return django_user_model.objects.create_user(
        "ann", password=PASSWORD, is_staff=True, is_superuser=True
    )


def log_in(client, page, password, username="ann"):
    return client.post(page, {"username": username, "password": password, "next": "/approvals/"})


@pytest.mark.parametrize("page", PAGES)
def test_it_locks_out_after_five_wrong_passwords_even_the_right_one(client, staff, page):
    for _ in range(4):
        assert log_in(client, page, "wrong").status_code == 200  # the form, with an error
    locked = log_in(client, page, "wrong")
    assert locked.status_code == 429
    assert "Too many failed logins" in locked.content.decode()
    right = log_in(client, page, PASSWORD)
    assert right.status_code == 429
    text = right.content.decode()
    assert "paused after 5 wrong passwords in a row" in text
    assert "0:15:00" in text  # the cool-off, as hours:minutes:seconds
    assert "_auth_user_id" not in client.session


def test_the_lockout_page_is_readable_and_names_the_way_out(client, staff):
    for _ in range(5):
        log_in(client, "/accounts/login/", "wrong")
    page = log_in(client, "/accounts/login/", PASSWORD).content.decode()
    assert "<h1>Too many failed logins</h1>" in page
    assert "as <strong>ann</strong>" in page
    assert "manage.py axes_reset_username ann" in page
    assert 'href="/static/approvals/toolgate.css"' in page  # Toolgate's page, styled


def test_one_pages_failures_count_on_the_other(client, staff):
    for _ in range(3):
        log_in(client, "/accounts/login/", "wrong")
    for _ in range(2):
        log_in(client, "/admin/login/", "wrong")
    assert log_in(client, "/accounts/login/", PASSWORD).status_code == 429


def test_a_successful_login_resets_the_count(client, staff):
    for _ in range(4):
        log_in(client, "/accounts/login/", "wrong")
    assert log_in(client, "/accounts/login/", PASSWORD).status_code == 302
    client.logout()
    for _ in range(4):
        log_in(client, "/accounts/login/", "wrong")
    assert log_in(client, "/accounts/login/", PASSWORD).status_code == 302


def test_another_user_is_not_locked_out_by_someone_elses_failures(client, staff, django_user_model):
    django_user_model.objects.create_user("bob", password=PASSWORD)
    for _ in range(6):
        log_in(client, "/accounts/login/", "wrong", username="ann")
    assert log_in(client, "/accounts/login/", PASSWORD, username="bob").status_code == 302


def test_the_lockout_ends_after_the_cool_off(client, staff):
    for _ in range(5):
        log_in(client, "/accounts/login/", "wrong")
    assert log_in(client, "/accounts/login/", PASSWORD).status_code == 429
    AccessAttempt.objects.update(attempt_time=timezone.now() - timedelta(minutes=16))
    assert log_in(client, "/accounts/login/", PASSWORD).status_code == 302


def test_the_failure_limit_is_a_setting(client, staff, settings):
    settings.AXES_FAILURE_LIMIT = 2
    log_in(client, "/accounts/login/", "wrong")
    assert log_in(client, "/accounts/login/", "wrong").status_code == 429


def test_malformed_login_settings_are_refused_at_start(tmp_path):
    result = start(tmp_path, LOGIN_LOCKOUT_BY="everyone")
    assert "LOGIN_LOCKOUT_BY='everyone' is not valid" in result.stderr
    assert "username_and_ip, ip, username" in result.stderr
    result = start(tmp_path, LOGIN_FAILURE_LIMIT="0")
    assert "LOGIN_FAILURE_LIMIT='0' is not valid" in result.stderr
    assert start(tmp_path, LOGIN_FAILURE_LIMIT="10", LOGIN_LOCKOUT_MINUTES="60").returncode == 0
