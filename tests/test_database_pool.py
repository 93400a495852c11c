"""The PostgreSQL connection pool (settings.DATABASE_POOL): page requests, each on a thread of
its own, take a pooled connection instead of opening one; the Celery worker runs without it, its
children each keeping a connection of their own, so no connection crosses a fork; SQLite is
left as it was."""

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx2
import psutil
import pytest
from django.db import connection
from django.db.backends.signals import connection_created

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_URL = "postgres://toolgate@db.internal:5432/toolgate"


def database_settings(tmp_path, **env):
    """settings.DATABASES["default"] as a fresh process loads it (nothing connects)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DATABASE_")}
    clean.update(TOOLGATE_VAR_DIR=str(tmp_path), DJANGO_SETTINGS_MODULE="config.settings", **env)
    script = "from django.conf import settings; import json; "
    script += "db = {**settings.DATABASES['default']}; "
    script += "db['reuse'] = getattr(settings, 'CELERY_DB_REUSE_MAX', None); "
    script += "print(json.dumps(db, default=str))"
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=clean, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_postgresql_gets_the_pool_with_its_sizes_and_no_persistent_connections(tmp_path):
    db = database_settings(tmp_path, DATABASE_URL=POSTGRES_URL)
    assert db["OPTIONS"]["pool"] == {"min_size": 2, "max_size": 20, "timeout": 10.0}
    assert db["CONN_MAX_AGE"] == 0  # Django's pool refuses anything else
    assert db["CONN_HEALTH_CHECKS"] is True  # the pool checks a connection before lending it
    assert db["reuse"] == 1000  # Celery's fix-up leaves a worker child's connection open

    db = database_settings(
        tmp_path,
        DATABASE_URL=POSTGRES_URL,
        DATABASE_POOL_MIN_SIZE="0",
        DATABASE_POOL_MAX_SIZE="5",
        DATABASE_POOL_TIMEOUT="2.5",
    )
    assert db["OPTIONS"]["pool"] == {"min_size": 0, "max_size": 5, "timeout": 2.5}


def test_the_pool_can_be_turned_off_and_sqlite_never_has_one(tmp_path):
    off = database_settings(tmp_path, DATABASE_URL=POSTGRES_URL, DATABASE_POOL="false")
    sqlite = database_settings(tmp_path)
    for db in (off, sqlite):
        assert "pool" not in db.get("OPTIONS", {})
        assert db["CONN_MAX_AGE"] == 60
    assert sqlite["reuse"] is None  # a SQLite connection costs nothing to open: as it was


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DATABASE_POOL_MIN_SIZE": "9", "DATABASE_POOL_MAX_SIZE": "4"}, "is larger than"),
        ({"DATABASE_POOL_MAX_SIZE": "0"}, "DATABASE_POOL_MAX_SIZE='0' is not valid"),
        ({"DATABASE_POOL": "sometimes"}, "DATABASE_POOL='sometimes' is not valid"),
    ],
)
def test_malformed_pool_sizes_are_refused(tmp_path, env, message):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DATABASE_")}
    clean.update(TOOLGATE_VAR_DIR=str(tmp_path), DATABASE_URL=POSTGRES_URL, **env)
    result = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=clean, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert message in result.stderr


postgresql_only = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="the pool is PostgreSQL's"
)


@pytest.fixture
def fresh_pool():
    """Django's pool as a web process starts it. The pool is the test process's (one per alias,
    a class attribute of the backend), so it is as earlier tests left it: threads querying at
    once grow it past DATABASE_POOL_MIN_SIZE (test_encryption's eight: nine connections), it
    keeps the extra ones idle for psycopg-pool's max_idle (10 min, then one closed at a time)
    and lends its idle connections in turn, first in first out, so six requests in a row met
    six of them. Closed here, it opens again at the test's first query with MIN_SIZE ones;
    a connection still out of the old pool is closed when it is given back."""
    connection.close_pool()


@pytest.mark.integration
@postgresql_only
def test_page_requests_in_a_row_share_pooled_connections(fresh_pool, toolgate, approver, client):
    """Django runs each page request on a new thread, and a connection is per thread: without
    the pool each of these requests opened a PostgreSQL connection (a new server backend)."""
    backends = []

    def opened(sender, connection, **kwargs):
        if connection.alias == "default":
            backends.append(connection.connection.info.backend_pid)

    assert connection.pool is not None
    cookies = {"sessionid": client.cookies["sessionid"].value}
    connection_created.connect(opened)
    try:
        with httpx2.Client(base_url=toolgate.base_url, cookies=cookies, timeout=10) as http:
            for _ in range(6):
                response = http.get("/approvals/")
                assert response.status_code == 200
                assert "alice" in response.text  # the session was read from the database
    finally:
        connection_created.disconnect(opened)
    assert len(backends) == 6  # each request took a connection...
    # ...from the pool, which opened its two (DATABASE_POOL_MIN_SIZE) and at most one more: a
    # request's thread gives its connection back at `request_finished`, after the response
    # went out, so the next request may come while this test's own and that one are both out.
    assert len(set(backends)) <= 3


def _postgres_sockets(process):
    """The local ports of `process`'s TCP connections to PostgreSQL's port."""
    port = connection.settings_dict["PORT"] or "5432"
    try:
        sockets = process.net_connections(kind="tcp")
    except psutil.Error:
        return set()
    return {s.laddr.port for s in sockets if s.raddr and str(s.raddr.port) == str(port)}


@pytest.mark.integration
@postgresql_only
@pytest.mark.django_db(transaction=True)
def test_a_forked_worker_child_holds_no_connection_of_its_parent(celery_worker, mcp_demo_http):
    """The worker runs tasks in forked children: a connection (or a pool of them) open in the
    main process when a child was forked would be one socket written by two processes. Each
    child keeps a connection of its own from task to task (config/celery.py)."""
    from approvals.models import Status, ToolCall, request_tool_call
    from integrations.models import Agent, ApprovalMode, McpServer
    from tests.conftest import wait_until

    server = McpServer.objects.create(
        name="demo", url=mcp_demo_http.url, allow_private_network=True,
        approval_mode=ApprovalMode.NO_APPROVAL,
    )  # fmt: skip
    assert server.sync_tools().ok
    agent, _ = Agent.create_with_token("bot", [server])
    for text in ("one", "two"):
        call, _ = request_tool_call(agent, "demo", "echo", {"text": text})
        wait_until(lambda call=call: ToolCall.objects.get(pk=call.pk).status == Status.SUCCEEDED)

    main = psutil.Process(celery_worker.pid)
    children = main.children(recursive=True)
    assert children, "a prefork worker has children"
    assert not _postgres_sockets(main)  # nothing open in the main process to be inherited
    seen = {}
    for process in children:
        for port in _postgres_sockets(process):
            assert port not in seen, f"processes {seen.get(port)} and {process.pid} share one"
            seen[port] = process.pid
    assert seen, "a child keeps its connection for its next task"
