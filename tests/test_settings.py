"""Start-up configuration: defaults that need nothing, clear errors for malformed values."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

ROOT = Path(__file__).resolve().parent.parent


def start(tmp_path, **env):
    """Load the settings in a fresh process, as `manage.py` would."""
    clean = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "DEBUG", "PORT"}}
    clean.update(TOOLGATE_VAR_DIR=str(tmp_path), **env)
    return subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=clean, capture_output=True, text=True
    )


def test_it_starts_with_no_configuration(tmp_path):
    result = start(tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "dev-secrets.json").stat().st_mode & 0o777 == 0o600


def test_a_malformed_value_names_the_variable(tmp_path):
    result = start(tmp_path, PORT="eighty")
    assert result.returncode != 0
    assert "PORT='eighty' is not valid" in result.stderr


def test_a_malformed_boolean_is_refused(tmp_path):
    result = start(tmp_path, DEBUG="maybe")
    assert "DEBUG='maybe' is not valid" in result.stderr


def test_production_refuses_to_start_without_a_secret_key(tmp_path):
    result = start(tmp_path, DEBUG="false")
    assert result.returncode != 0
    assert "SECRET_KEY must be set" in result.stderr


def test_production_refuses_to_start_without_an_encryption_key(tmp_path):
    result = start(tmp_path, DEBUG="false", SECRET_KEY="x1y2z" * 10)
    assert "FIELD_ENCRYPTION_KEYS must be set" in result.stderr


def test_production_refuses_a_malformed_encryption_key(tmp_path):
    result = start(tmp_path, DEBUG="false", SECRET_KEY="x1y2z" * 10, FIELD_ENCRYPTION_KEYS="nope")
    assert "not a Fernet key" in result.stderr


def test_production_starts_with_real_keys(tmp_path):
    key = Fernet.generate_key().decode()
    result = start(tmp_path, DEBUG="false", SECRET_KEY="x1y2z" * 10, FIELD_ENCRYPTION_KEYS=key)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "dev-secrets.json").exists()


def test_calls_are_not_handed_to_a_human_while_the_web_process_may_still_run_them(tmp_path):
    """A call the web process runs for a waiting agent is bounded by MCP_CALL_TIMEOUT alone,
    not by a worker's time limit: a TOOL_CALL_LOST_AFTER below it let the sweeper make such
    a call `unknown` while it ran, and the result it then brought was not stored."""
    limits = {"MCP_CALL_TIMEOUT": "300", "TOOL_CALL_TIME_LIMIT": "60"}
    result = start(tmp_path, TOOL_CALL_LOST_AFTER="120", **limits)
    assert result.returncode != 0
    assert "TOOL_CALL_LOST_AFTER (120) must be above the longest a call can run" in result.stderr
    assert start(tmp_path, **limits).returncode == 0  # the default follows MCP_CALL_TIMEOUT


def test_a_malformed_database_url_is_refused(tmp_path):
    result = start(tmp_path, DATABASE_URL="nosuchdb://x")
    assert result.returncode != 0
    assert "DATABASE_URL" in result.stderr


# A URL variable holds a password: its errors name the variable and what is wrong, never the
# value. A password with an unencoded "/" makes the parser quote its first part as "the port".
PASSWORD = "Pa55/w0rd-Zq9"
LEAKS = ("Pa55", "w0rd-Zq9", PASSWORD)


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("DATABASE_URL", f"postgres://toolgate:{PASSWORD}@db.internal:5432/toolgate", "port"),
        ("DATABASE_URL", f"mysql://toolgate:{PASSWORD}x@db.internal/toolgate", "'mysql'"),
        ("DATABASE_URL", "postgres://toolgate:Pa55w0rd-Zq9@[db/toolgate", "host"),
        ("CELERY_BROKER_URL", f"redis://:{PASSWORD}@cache.internal:6379/0", "port"),
        ("CELERY_BROKER_URL", f"amqp://u:{PASSWORD}x@mq.internal//", "'amqp'"),
        ("CELERY_BROKER_URL", f"{PASSWORD}", "scheme://"),
        ("EMAIL_URL", f"smtp+tls://mailer:{PASSWORD}@smtp.example:587", "port"),
        ("EMAIL_URL", f"smtps+x://mailer:{PASSWORD}x@smtp.example:587", "'smtps+x'"),
    ],
)
def test_a_malformed_url_names_the_variable_but_never_its_password(tmp_path, name, value, problem):
    result = start(tmp_path, **{name: value})
    assert result.returncode != 0
    assert f"{name} is not valid:" in result.stderr and problem in result.stderr
    assert "it may hold a password" in result.stderr
    for leak in LEAKS:
        assert leak not in result.stderr + result.stdout


def test_a_well_formed_url_with_an_encoded_password_is_accepted(tmp_path):
    encoded = PASSWORD.replace("/", "%2F")
    broker = f"redis://:{encoded}@127.0.0.1:6379/0"
    result = start(tmp_path, CELERY_BROKER_URL=broker, EMAIL_URL=f"smtp://u:{encoded}@h:25")
    assert result.returncode == 0, result.stderr


def test_the_services_probe_of_make_test_never_prints_a_password():
    probe = [sys.executable, "-m", "tests.services"]
    database = "postgresql://toolgate:Pa55%zzw0rd-Zq9@127.0.0.1:1/toolgate"  # psycopg quotes it
    redis_url = f"redis://:{PASSWORD}@127.0.0.1:6379/0"
    result = subprocess.run([*probe, database, redis_url], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and "Not reachable" in result.stderr
    for leak in LEAKS:
        assert leak not in result.stderr + result.stdout
