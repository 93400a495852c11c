"""Start-up configuration: defaults that need nothing, clear errors for malformed values."""

import os
import subprocess
import sys
from pathlib import Path

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


def test_a_malformed_database_url_is_refused(tmp_path):
    result = start(tmp_path, DATABASE_URL="nosuchdb://x")
    assert result.returncode != 0
    assert "DATABASE_URL" in result.stderr
