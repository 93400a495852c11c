"""A throw-away Toolgate on 127.0.0.1 for one benchmark run.

`Toolgate` is a context manager. Entering it makes a temporary var dir (fresh SQLite database,
file broker, dev secrets), points this process's Django at it, runs ``manage.py migrate``,
starts the demo MCP server in a subprocess, registers it and creates an agent. `start_app()`
then starts the web server (uvicorn, one process) and a Celery worker as subprocesses, each in
a process group of its own; `stop_app()` stops them. Leaving the context stops everything it
started and removes the var dir, whether the run ended normally, failed or was interrupted.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
HOST = "127.0.0.1"
REDIS_URL = "redis://127.0.0.1:6379/14"
POSTGRES_URL = "postgres://postgres@127.0.0.1:5432/postgres"  # where throw-away databases go
SERVER_NAME = "demo"
AGENT_NAME = "bench-agent"

# Variables of the caller's environment that would point the run away from its own var dir.
_OVERRIDDEN = ("DATABASE_URL", "CELERY_BROKER_URL", "CELERY_BROKER_DIR", "TOOLGATE_VAR_DIR")


class BenchError(Exception):
    """The benchmark could not run; the message says why."""


_interrupted = []  # the signals received


def interrupt_on_signals():
    """Turn the first SIGINT, SIGTERM or SIGHUP into KeyboardInterrupt, so teardown runs for
    each as for Ctrl-C; later ones are noted but do not interrupt the teardown itself.

    Our own handler also keeps `asyncio.run` from installing its SIGINT handler, which only
    cancels the main task: the MCP SDK can absorb that cancellation and carry on. Loops also
    call `check_interrupted()`, in case a library swallows the KeyboardInterrupt.
    """

    def interrupt(signum, frame):
        _interrupted.append(signum)
        if len(_interrupted) == 1:
            raise KeyboardInterrupt(f"signal {signum}")

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)


def check_interrupted():
    if _interrupted:
        raise KeyboardInterrupt(f"signal {_interrupted[0]}")


def raise_open_file_limit(needed):
    """Raise this process's soft limit on open files (children inherit it) to `needed`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port():
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def redis_answers(url=REDIS_URL, timeout=1.0):
    """True when a Redis server answers PING at `url`'s host and port."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port or 6379), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def postgres_answers(url=POSTGRES_URL):
    """True when PostgreSQL accepts a connection at `url`."""
    import psycopg

    try:
        psycopg.connect(url, connect_timeout=2).close()
    except psycopg.Error:
        return False
    return True


def _create_database(url, name):
    import psycopg

    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')


def _drop_database(url, name):
    import psycopg

    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def flush_redis(url=REDIS_URL):
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        client.flushdb()
    finally:
        client.close()


def percentile(values, p):
    """Nearest-rank percentile of `values` (0 < p <= 100)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def hand_offs(idle=0.005, times=200):
    """What waking a thread costs on this machine, in microseconds: the median round trip of a
    no-op handed from an event loop to a thread and back, back to back (`busy`) and after the
    loop sat `idle` seconds in its poll (`idle`). A waited API call makes eight such hand-offs
    between threads and processes (agent -> web, loop -> database thread -> loop twice, loop ->
    upstream -> loop, web -> agent), the direct call two; where an idle CPU is slow to wake (a
    VM's vCPU halts), each costs a multiple of what it does back to back, and the ratios to the
    direct call, which never lets its CPUs go idle, rise with it (bench/README.md)."""
    import asyncio
    import statistics
    from concurrent.futures import ThreadPoolExecutor

    async def measure(executor):
        loop = asyncio.get_running_loop()
        figures = {}
        for name, pause in (("warm-up", 0), ("busy", 0), ("idle", idle)):
            timings = []
            for _ in range(times):
                if pause:
                    await asyncio.sleep(pause)
                started = time.perf_counter()
                await loop.run_in_executor(executor, int)
                timings.append(time.perf_counter() - started)
            figures[name] = statistics.median(timings) * 1e6
        del figures["warm-up"]
        return figures

    with ThreadPoolExecutor(1) as executor:
        return asyncio.run(measure(executor))


class Child:
    """A subprocess in its own session (process group), output to a log file."""

    def __init__(self, name, command, env, log_dir, **popen):
        self.name = name
        self.log = log_dir / f"{name}.log"
        with open(self.log, "ab") as out:
            popen.setdefault("stdout", out)
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stderr=out,
                start_new_session=True,
                **popen,
            )

    @property
    def pid(self):
        return self.process.pid

    def alive(self):
        return self.process.poll() is None

    def log_tail(self, chars=3000):
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout=20):
        """SIGTERM to the process (a Celery worker then stops its own pool), then SIGKILL to
        whatever is left of its group."""
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout)
        # The leader may be gone while pool children of its group linger.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        for stream in (self.process.stdin, self.process.stdout):
            if stream:
                with contextlib.suppress(OSError):
                    stream.close()


def journal_mode():
    """SQLite's journal mode of the benchmark database (Toolgate's settings ask for WAL)."""
    from django.db import connection

    if connection.vendor != "sqlite":
        return connection.vendor
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA journal_mode")
        return f"SQLite, {cursor.fetchone()[0]} journal"


class Toolgate:
    """See the module docstring. `approval_mode` is the demo server's approval mode;
    `mcp_tests_helper` serves the demo server through `tests.mcp_servers.start` unchanged
    (see bench/mcp_server.py); `postgres` puts the database in a throw-away PostgreSQL
    database on `POSTGRES_URL`'s server instead of SQLite."""

    def __init__(
        self, approval_mode, *, keep=False, mcp_tests_helper=False, postgres=False,
        database_url=None,
    ):  # fmt: skip
        self.approval_mode = approval_mode
        self.keep = keep
        self.mcp_tests_helper = mcp_tests_helper
        self.postgres = postgres
        # A postgres:// URL naming a database this run creates, uses and drops (it must not
        # exist); `postgres` picks such a name on POSTGRES_URL's server; by default a fresh
        # SQLite file in the var dir.
        self.database_url = database_url
        self.web = self.worker = self.mcp = None
        self.port = None
        self.broker_url = "filesystem://"

    # ---- set-up and teardown ---------------------------------------------------------------

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        try:
            self.var_dir = Path(tempfile.mkdtemp(prefix="toolgate-bench-"))
            self._stack.callback(self._remove_var_dir)
            if self.database_url:
                self._create_database()
            elif self.postgres:
                name = f"toolgate_bench_{os.getpid()}"
                _drop_database(POSTGRES_URL, name)
                _create_database(POSTGRES_URL, name)
                self._stack.callback(_drop_database, POSTGRES_URL, name)
                self.database_url = POSTGRES_URL.rpartition("/")[0] + "/" + name
            else:
                self.database_url = f"sqlite:///{self.var_dir / 'toolgate.sqlite3'}"
            self.env = self._environment()
            os.environ.update(self.env)
            self._setup_django()
            self._migrate()
            self.mcp_url = self._start_mcp_server()
            self.token = self._register()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc_info):
        try:
            self.stop_app()
        finally:
            self._stack.close()

    def _environment(self):
        env = {key: value for key, value in os.environ.items() if key not in _OVERRIDDEN}
        env.update(
            TOOLGATE_VAR_DIR=str(self.var_dir),
            DEBUG="true",
            DATABASE_URL=self.database_url,
            CELERY_BROKER_URL="filesystem://",
            CELERY_BROKER_DIR=str(self.var_dir / "broker"),
            AGENT_RATE_LIMIT="100000",
            LOG_LEVEL="WARNING",
            DJANGO_SETTINGS_MODULE="config.settings",
            PYTHONUNBUFFERED="1",
        )
        return env

    def _remove_var_dir(self):
        if self.keep:
            print(f"(kept {self.var_dir})")
        else:
            shutil.rmtree(self.var_dir, ignore_errors=True)

    def _setup_django(self):
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        import django
        from django.conf import settings

        django.setup()
        name = settings.DATABASES["default"]["NAME"]
        if self.database_url.startswith("sqlite"):
            elsewhere = Path(name).parent != self.var_dir
        else:
            elsewhere = name != self.database_url.rsplit("/", 1)[1]
        if elsewhere:
            raise BenchError("Django was already set up on another database in this process.")

    def _create_database(self):
        """Create the run's PostgreSQL database (from the server's `postgres` database), and
        drop it when the run ends."""
        import psycopg

        server, name = self.database_url.rsplit("/", 1)

        def execute(sql):
            with psycopg.connect(f"{server}/postgres", autocommit=True, connect_timeout=5) as db:
                db.execute(sql)

        execute(f'CREATE DATABASE "{name}"')
        self._stack.callback(execute, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _migrate(self):
        done = subprocess.run(
            [PYTHON, "manage.py", "migrate", "--noinput"],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode:
            raise BenchError(f"manage.py migrate failed:\n{done.stdout}\n{done.stderr}")

    def _start_mcp_server(self):
        self.mcp = Child(
            "mcp-server",
            [PYTHON, "-m", "bench.mcp_server", *(["--tests-helper"] * self.mcp_tests_helper)],
            self.env,
            self.var_dir,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self._stack.callback(self.mcp.stop)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.mcp.alive():
            ready, _, _ = select.select([self.mcp.process.stdout], [], [], 0.5)
            if ready:
                line = self.mcp.process.stdout.readline().decode().strip()
                if line.startswith(f"http://{HOST}:"):
                    return line
                break
        raise BenchError(f"The demo MCP server did not start:\n{self.mcp.log_tail()}")

    def _register(self):
        from django.contrib.auth import get_user_model

        from integrations.models import Agent, McpServer

        server = McpServer.objects.create(
            name=SERVER_NAME,
            url=self.mcp_url,
            transport="streamable_http",
            approval_mode=self.approval_mode,
            allow_private_network=True,
            allow_http=True,
        )
        result = server.sync_tools()
        if not result.ok:
            raise BenchError(f"Syncing the demo MCP server failed: {result}")
        self.user = get_user_model().objects.create_user("bench-approver")
        for tool in server.tools.all():
            if tool.needs_review:  # e.g. a scanner warning: a human has looked at it now
                tool.mark_reviewed(self.user)
        self.server = server
        agent = Agent(name=AGENT_NAME)
        token = agent.set_new_token()
        agent.save()
        agent.servers.set([server])
        self.agent = agent
        return token

    # ---- web server and worker ---------------------------------------------------------------

    @property
    def base_url(self):
        return f"http://{HOST}:{self.port}"

    @property
    def auth(self):
        return {"Authorization": f"Bearer {self.token}"}

    def start_app(self, broker_url="filesystem://", *, web_open_files=None, env=None):
        """Start uvicorn and a Celery worker on `broker_url`; return once both are up.

        `web_open_files` sets the web process's soft limit on open files (to see how a host
        with the usual default of 1024 fares); by default it inherits this process's limit.
        `env` adds variables for both (e.g. CELERY_BROKER_KEY_PREFIX).
        """
        self.stop_app()
        self.broker_url = broker_url
        env = {**self.env, "CELERY_BROKER_URL": broker_url, **(env or {})}
        tag = "redis" if broker_url.startswith("redis") else "file"
        self.port = free_port()
        web = [PYTHON, "-m", "uvicorn", "config.asgi:application"]
        web += ["--host", HOST, "--port", str(self.port), "--log-level", "warning"]
        self.web = Child(f"web-{tag}", web, env, self.var_dir)
        if web_open_files:
            import psutil

            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            psutil.Process(self.web.pid).rlimit(psutil.RLIMIT_NOFILE, (web_open_files, hard))
        worker = [PYTHON, "-m", "celery", "-A", "config", "worker"]
        worker += ["--concurrency", "2", "--loglevel", "WARNING"]
        worker += ["--without-mingle", "--without-gossip", "-n", f"bench{os.getpid()}@%h"]
        self.worker = Child(f"worker-{tag}", worker, env, self.var_dir)
        try:
            self._wait_for_web()
            self._wait_for_worker()
        except BaseException:
            self.stop_app()
            raise

    def stop_app(self):
        for child in (self.web, self.worker):
            if child is not None:
                child.stop()
        self.web = self.worker = None

    def _wait_for_web(self, timeout=60):
        deadline = time.monotonic() + timeout
        with httpx2.Client(base_url=self.base_url, headers=self.auth, timeout=5) as http:
            while time.monotonic() < deadline and self.web.alive():
                try:
                    response = http.get("/api/v1/tools")
                except httpx2.TransportError:
                    time.sleep(0.2)
                    continue
                if response.status_code == 200:
                    return
                raise BenchError(f"GET /api/v1/tools answered {response.status_code}")
        raise BenchError(f"The web server did not start:\n{self.web.log_tail()}")

    def _wait_for_worker(self, timeout=60):
        """Wait until the worker's prefork pool (two processes) is up."""
        import psutil

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.worker.alive():
            with contextlib.suppress(psutil.Error):
                if len(psutil.Process(self.worker.pid).children()) >= 2:
                    time.sleep(1.0)  # the consumer connects just after the pool starts
                    return
            time.sleep(0.2)
        raise BenchError(f"The Celery worker did not start:\n{self.worker.log_tail()}")

    def check_alive(self):
        for child in (self.web, self.worker, self.mcp):
            if child is not None and not child.alive():
                raise BenchError(f"The {child.name} process died:\n{child.log_tail()}")
