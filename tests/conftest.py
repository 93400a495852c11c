"""Shared fixtures: real MCP servers on loopback (tests/mcp_servers.py), receivers of
notifications (tests/receivers.py), a real Celery worker in its own process, and admin users."""

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import hypothesis
import psutil
import pytest
from django.conf import settings
from django.core.cache import cache
from django.db import connection
from hypothesis import HealthCheck, Phase
from kombu import Connection

from config.celery import app as celery_app

pytest_plugins = ["tests.mcp_servers", "tests.receivers", "tests.mcp_live"]

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
def _no_pooled_sessions_across_tests():
    """A worker's call run in this process (`ToolCall.run`) leaves its session open on the
    process's loop thread (integrations/mcp_pool.py): closed after each test, so no test's
    call meets another test's server on a port the kernel gave out again."""
    yield
    from integrations import mcp_pool

    mcp_pool.close_loop_thread_sessions()


@pytest.fixture(autouse=True)
def _fresh_cache():
    """The cache holds rate-limit counters keyed by agent id; ids repeat across tests."""
    cache.clear()


@pytest.fixture
def admin_user(django_user_model):
    return django_user_model.objects.create_superuser("boss", password="pw-boss-123")


@pytest.fixture
def approver(client):
    """alice, in the Approvers group, logged in on `client`."""
    from django.contrib.auth.models import Group, User

    user = User.objects.create_user("alice", password="pw-alice-123")
    user.groups.add(Group.objects.get(name="Approvers"))
    client.force_login(user)
    return user


@pytest.fixture
def admin_client(client, admin_user):
    client.force_login(admin_user)
    return client


# This run's own name on the services it shares with other runs and programs (the PostgreSQL
# server, Redis): its database and broker keys carry it, so two runs never meet. Its files (the
# file broker's folder, the SQLite test database) live in a temporary folder named after it.
RUN_ID = os.environ.get("TOOLGATE_TEST_RUN_ID") or secrets.token_hex(4)
RUN_DIR = None  # made by pytest_configure, removed by pytest_unconfigure
# Every process the run starts inherits this variable (set in pytest_configure), so whatever a
# test left behind is found at the end, tracked or not, even after its parent died.
PROCESS_MARK = "TOOLGATE_TEST_PROCESS_OF"
_ON_REDIS = settings.CELERY_BROKER_URL.startswith(("redis://", "rediss://"))
_spawned = []  # every process a test started, stopped at the end whatever happened
SESSION_BROKER_ENV = {}  # what puts a worker on this run's broker, filled by pytest_configure
WORKER_NOTIFY_BATCH_SECONDS = 3  # the session worker's digest window


def _file_broker_options(folder):
    folders = {name: folder / name for name in ("queue", "processed", "control")}
    for path in folders.values():
        path.mkdir(parents=True, exist_ok=True)
    options = {
        **settings.CELERY_BROKER_TRANSPORT_OPTIONS,
        "data_folder_in": str(folders["queue"]),
        "data_folder_out": str(folders["queue"]),
        "processed_folder": str(folders["processed"]),
        "control_folder": str(folders["control"]),
    }
    return options, folders["queue"]


def _forget_redis_keys(prefix):
    """Delete what a run left under its key prefix in the shared Redis database."""
    with Connection(settings.CELERY_BROKER_URL) as conn:
        client = conn.default_channel.client
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        if keys:
            client.delete(*keys)


def pytest_configure(config):
    """Point this run's Celery at a broker of its own before anything is enqueued: a fresh
    folder for the file transport (not var/broker, which `make run`'s worker reads), or a key
    prefix of its own in Redis. A SIGTERM (a CI timeout, `kill`) ends the run like Ctrl-C, so
    fixture finalizers and pytest_unconfigure still stop every process a test started."""
    global RUN_DIR
    RUN_DIR = Path(tempfile.mkdtemp(prefix=f"toolgate-test-{RUN_ID}-"))
    if _ON_REDIS:
        options = {**settings.CELERY_BROKER_TRANSPORT_OPTIONS}
        options["global_keyprefix"] = f"toolgate-test-{RUN_ID}:"
        SESSION_BROKER_ENV["CELERY_BROKER_KEY_PREFIX"] = options["global_keyprefix"]
    else:
        folder = RUN_DIR / "broker"
        options, _ = _file_broker_options(folder)
        SESSION_BROKER_ENV["CELERY_BROKER_DIR"] = str(folder)
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = options
    celery_app.conf.broker_transport_options = options
    os.environ[PROCESS_MARK] = RUN_ID
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def pytest_unconfigure(config):
    stop_spawned_processes()
    stop_strays()
    if _ON_REDIS:
        with contextlib.suppress(Exception):
            _forget_redis_keys(f"toolgate-test-{RUN_ID}")
    if RUN_DIR is not None:
        shutil.rmtree(RUN_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix):
    """A test database of this run's own: on PostgreSQL named after the run, on SQLite a file
    in the run's folder (not var/, where another run in this checkout would share it)."""
    from django.db import connections

    for alias in connections:
        db = connections[alias].settings_dict
        if db["ENGINE"].endswith("postgresql"):
            db.setdefault("TEST", {})["NAME"] = f"test_{db['NAME']}_{RUN_ID}"
        elif db["ENGINE"].endswith("sqlite3"):
            db.setdefault("TEST", {})["NAME"] = str(RUN_DIR / f"test-{alias}.sqlite3")


def track(process):
    """Stop `process` and everything it started when the test run ends, even after a failure."""
    _spawned.append(process)
    return process


def stop_process_tree(process, timeout=20):
    """SIGTERM the process and its children; SIGKILL what is left, and every process group
    they led (an orphan that left the tree stays in its group), never this run's own group."""
    try:
        tree = psutil.Process(process.pid)
        members = [*tree.children(recursive=True), tree]
    except psutil.NoSuchProcess:
        members = []
    groups = {process.pid}
    for member in members:
        with contextlib.suppress(OSError):
            groups.add(os.getpgid(member.pid))
    groups.discard(os.getpgid(0))
    for member in members:
        with contextlib.suppress(psutil.Error):
            member.terminate()
    _gone, alive = psutil.wait_procs(members, timeout=timeout)
    for member in alive:
        with contextlib.suppress(psutil.Error):
            member.kill()
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


def stop_strays():
    """SIGKILL every process that still carries this run's mark: one a test started without
    track(), or one whose parent died and left it to init (so it is in no tracked tree)."""
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):
            if process.environ().get(PROCESS_MARK) == RUN_ID:
                process.kill()


def stop_spawned_processes():
    while _spawned:
        process = _spawned.pop()
        if process.poll() is None or _has_children(process):
            stop_process_tree(process, timeout=10)


def _has_children(process):
    try:
        return bool(psutil.Process(process.pid).children(recursive=True))
    except psutil.Error:
        return False


def private_broker(folder, name):
    """A broker nobody else reads: a fresh folder for the file transport, or a Redis key prefix
    of its own. Returns a kombu connection to it, the environment a worker needs to use it, and
    the folder messages are queued in (None on Redis). `release_private_broker` cleans up."""
    if not _ON_REDIS:
        options, queue = _file_broker_options(folder)
        env = {"CELERY_BROKER_URL": "filesystem://", "CELERY_BROKER_DIR": str(folder)}
        transport = settings.CELERY_BROKER_TRANSPORT  # with the doorbell, as the app sends
        connection = Connection("filesystem://", transport=transport, transport_options=options)
        return connection, env, queue
    prefix = f"toolgate-test-{RUN_ID}-{name}:"
    options = {**settings.CELERY_BROKER_TRANSPORT_OPTIONS, "global_keyprefix": prefix}
    connection = Connection(settings.CELERY_BROKER_URL, transport_options=options)
    env = {"CELERY_BROKER_URL": settings.CELERY_BROKER_URL, "CELERY_BROKER_KEY_PREFIX": prefix}
    return connection, env, None


def release_private_broker(connection, name):
    connection.release()
    if _ON_REDIS:
        _forget_redis_keys(f"toolgate-test-{RUN_ID}-{name}:")


@pytest.fixture
def own_broker(tmp_path, request):
    """A broker only this test's worker listens to (the session's worker can't take what is
    sent there, and it stays there until the test looks): (kombu connection, worker env)."""
    name = request.module.__name__.rpartition(".")[2]
    connection, env, _ = private_broker(tmp_path, name)
    yield connection, env
    release_private_broker(connection, name)


def _database_url():
    """The URL of the test database, for a worker process to open the same one."""
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


@pytest.fixture(scope="session")
def celery_broker():
    """The environment that puts a worker on this run's own broker (see pytest_configure)."""
    return {"CELERY_BROKER_URL": settings.CELERY_BROKER_URL, **SESSION_BROKER_ENV}


@pytest.fixture(scope="session")
def celery_worker(django_db_setup, django_db_blocker, celery_broker, smtp_server, tmp_path_factory):
    """A real `celery -A config worker` process on the test database and the test broker,
    sending e-mail to `smtp_server`, with notification digests of 3 s and quick retries.

    Tests using it need `transactional_db`: the worker only sees committed rows.
    """
    with django_db_blocker.unblock():
        database_url = _database_url()
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    process = spawn_worker(
        database_url,
        celery_broker,
        log,
        EMAIL_URL=smtp_server.url,
        NOTIFY_BATCH_SECONDS=str(WORKER_NOTIFY_BATCH_SECONDS),
        NOTIFY_RETRY_BACKOFF="1",
        NOTIFY_MAX_ATTEMPTS="3",
    )
    yield process
    stop_process_tree(process)


@pytest.fixture
def syncs_kept_here(monkeypatch):
    """Syncs the code asks a worker for (`request_sync`) are recorded, not queued: returns the
    list of server pks. A transactional test that syncs by itself would otherwise race with
    the session's `celery_worker` (started by an earlier test) running the same sync in the
    background: it renews tokens, sends requests and counts failures while the test asserts."""
    from integrations.tasks import sync_server

    requested = []
    monkeypatch.setattr(sync_server, "delay", requested.append)
    return requested


def spawn_worker(database_url, broker_env, log, concurrency=2, **extra_env):
    """Start `celery -A config worker` (`concurrency` prefork children) in its own process
    group; return once it is ready."""
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
        str(concurrency),
        "--without-mingle",
        "--without-gossip",
        "-n",
        f"{log.stem}-{RUN_ID}@%h",
    ]
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    track(process)
    _wait_for(lambda: "ready." in log.read_text(), process, log)
    process.log = log
    return process


def _wait_for(condition, process, log, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process_tree(process, timeout=5)
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
        try:
            yield browser
        finally:  # a failing test too: no browser outlives it
            browser.close()


@pytest.fixture(scope="session")
def chromium_path():
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.fail("Chromium is needed for the browser tests: apt-get install chromium")
    return path


def before_migration(approvals_migration):
    """The database as it was at `approvals_migration`: (the ToolCall manager of then, a
    server and an agent to make calls with)."""
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connection)
    others = [node for node in executor.loader.graph.leaf_nodes() if node[0] != "approvals"]
    before = [("approvals", approvals_migration), *others]
    executor.migrate(before)
    old = executor.loader.project_state(before).apps
    server = old.get_model("integrations", "McpServer").objects.create(name="s", url="x")
    agent = old.get_model("integrations", "Agent").objects.create(name="a", token_hash="h")
    return old.get_model("approvals", "ToolCall").objects, server, agent


def migrate_to_latest():
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(executor.loader.graph.leaf_nodes())


@pytest.fixture
def loop():
    """An event loop on a thread of its own, as the web process's (tests/test_mcp_pool.py)."""
    from asgiref.sync import sync_to_async
    from django.db import connections

    from tests.test_mcp_pool import Loop

    running = Loop()
    yield running
    # The application's hops share one database thread (asgiref's), whose connection would
    # outlive the test: PostgreSQL then refuses to drop the test database at the run's end.
    running.run(sync_to_async(connections.close_all)())
    running.close()


@pytest.fixture
def upstream():
    """A real SDK MCP server on loopback that records the requests it gets (`.recording`)."""
    from tests.mcp_servers import start
    from tests.test_mcp_pool import Recording

    recording = Recording()
    with start(recording) as running:
        running.recording = recording
        yield running


@pytest.fixture
def roomy_budget(monkeypatch):
    """The cheap decision's CPU budget (`validation.INLINE_BUDGET`, 1 ms) raised to 0.2 s, for
    tests that count a call's hops or name the thread a cheap check ran on: a garbage
    collection or a loaded machine (CI's, once) can push a cheap check past 1 ms, which then
    goes to a validation thread (two hops more), as designed. Still well under the deadlines
    the tests set (0.5 s), so a hostile schema stops at the budget, not at the deadline."""
    from approvals import validation

    monkeypatch.setattr(validation, "INLINE_BUDGET", 0.2)
