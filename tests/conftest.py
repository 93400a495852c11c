"""Shared fixtures: real MCP servers on loopback (tests/mcp_servers.py), a real Celery worker
in its own process, and admin users."""

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import hypothesis
import pytest
from django.conf import settings
from django.core.cache import cache
from django.db import connection
from hypothesis import HealthCheck, Phase
from kombu import Connection

from config.celery import app as celery_app

pytest_plugins = ["tests.mcp_servers"]

ROOT = Path(__file__).resolve().parent.parent

# Property-based tests: the same inputs on every run (a CI failure reproduces from the test
# name alone); TOOLGATE_HYPOTHESIS_EXPLORE=1 draws 1000 fresh ones per test instead.
EXPLORE = bool(os.environ.get("TOOLGATE_HYPOTHESIS_EXPLORE"))
HYPOTHESIS_PROPERTIES = hypothesis.settings(
    max_examples=1000 if EXPLORE else 150,
    derandomize=not EXPLORE,
    database=None,
    deadline=None,
    # Explaining a failure re-runs it many times through Django: minutes for little gain.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # each example runs in a rolled-back savepoint
        HealthCheck.too_slow,
        HealthCheck.large_base_example,
    ],
)


@pytest.fixture(autouse=True)
def _fast_mcp_timeouts(settings):
    """Tests talk to loopback servers; a misbehaving one should fail fast."""
    settings.MCP_CONNECT_TIMEOUT = 3
    settings.MCP_READ_TIMEOUT = 5
    settings.MCP_SYNC_TIMEOUT = 10
    settings.MCP_CALL_TIMEOUT = 10


@pytest.fixture(autouse=True)
def _fresh_cache():
    """The cache holds rate-limit counters keyed by agent id; ids repeat across tests."""
    cache.clear()


@pytest.fixture
def admin_user(django_user_model):
    return django_user_model.objects.create_superuser("boss", password="pw-boss-123")


@pytest.fixture
def admin_client(client, admin_user):
    client.force_login(admin_user)
    return client


def private_broker(folder, redis_db):
    """A broker nobody else reads: a fresh folder for the file transport, or an emptied Redis
    database. Returns a kombu connection to it, the environment a worker needs to use it, and
    the folder messages are queued in (None on Redis)."""
    if settings.CELERY_BROKER_URL.startswith("filesystem://"):
        folders = {name: folder / name for name in ("queue", "processed", "control")}
        for path in folders.values():
            path.mkdir()
        options = {
            **settings.CELERY_BROKER_TRANSPORT_OPTIONS,
            "data_folder_in": str(folders["queue"]),
            "data_folder_out": str(folders["queue"]),
            "processed_folder": str(folders["processed"]),
            "control_folder": str(folders["control"]),
        }
        env = {"CELERY_BROKER_URL": "filesystem://", "CELERY_BROKER_DIR": str(folder)}
        return Connection("filesystem://", transport_options=options), env, folders["queue"]
    url = settings.CELERY_BROKER_URL.rsplit("/", 1)[0] + f"/{redis_db}"
    connection = Connection(url)
    connection.default_channel.client.flushdb()
    return connection, {"CELERY_BROKER_URL": url}, None


def _database_url():
    """The URL of the test database, for a worker process to open the same one."""
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


@pytest.fixture(scope="session")
def celery_broker(tmp_path_factory):
    """A broker of the test session's own: an empty folder, or a purged Redis database."""
    env = {"CELERY_BROKER_URL": settings.CELERY_BROKER_URL}
    if settings.CELERY_BROKER_URL.startswith("filesystem://"):
        folder = tmp_path_factory.mktemp("broker")
        for sub in ("queue", "processed"):
            (folder / sub).mkdir()
        options = {
            **settings.CELERY_BROKER_TRANSPORT_OPTIONS,
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
        }
        celery_app.conf.broker_transport_options = options
        env["CELERY_BROKER_DIR"] = str(folder)
    else:
        with celery_app.connection_for_write() as conn:
            conn.default_channel.queue_purge("celery")
    return env


@pytest.fixture(scope="session")
def celery_worker(django_db_setup, django_db_blocker, celery_broker, tmp_path_factory):
    """A real `celery -A config worker` process on the test database and the test broker.

    Tests using it need `transactional_db`: the worker only sees committed rows.
    """
    with django_db_blocker.unblock():
        database_url = _database_url()
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    process = spawn_worker(database_url, celery_broker, log)
    yield process
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def spawn_worker(database_url, broker_env, log, **extra_env):
    """Start `celery -A config worker` in its own process group; return once it is ready."""
    env = {
        **os.environ,
        **broker_env,
        "DATABASE_URL": database_url,
        "MCP_CONNECT_TIMEOUT": "3",
        "MCP_READ_TIMEOUT": "5",
        "MCP_SYNC_TIMEOUT": "10",
        "MCP_CALL_TIMEOUT": "3",
        "TOOL_CALL_MAX_ATTEMPTS": "2",
        **extra_env,
    }
    command = [sys.executable, "-m", "celery", "-A", "config", "worker", "--loglevel", "INFO"]
    command += [
        "--concurrency",
        "2",
        "--without-mingle",
        "--without-gossip",
        "-n",
        f"{log.stem}@%h",
    ]
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    _wait_for(lambda: "ready." in log.read_text(), process, log)
    process.log = log
    return process


def _wait_for(condition, process, log, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"Celery worker did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def wait_until(condition, timeout=30, interval=0.1):
    """Poll `condition` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


# Headless Chromium on a machine without network: no background services phoning home.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@contextlib.contextmanager
def launch_chromium(path):
    """Debian's Chromium driven by Playwright (which can't download its own browsers here).

    Start it after the test's database and MCP setup: while Playwright's sync API runs, the
    thread has an event loop, and code that starts one of its own (the MCP client) can't run.
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def chromium_path():
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.fail("Chromium is needed for the browser tests: apt-get install chromium")
    return path
