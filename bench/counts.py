"""What one auto-approved ``POST /api/v1/tool-calls?wait=30`` costs the web process, counted
rather than timed (so it doesn't move with the machine's load): SQL statements (writes among
them), commits, and hops from the event loop to a thread (the shared database thread or the
validation threads), each a GIL hand-over and a wake-up of the loop; and the CPU time per call
of this process (the application and the agent's client together, one call at a time, so no
contention inflates it; the upstream server runs in a process of its own).

``python -m bench.counts [--calls N] [--mcp] [--postgres]``: a throw-away Toolgate
(`bench.harness.Toolgate`: its SQLite database, or PostgreSQL's with Django's pool, the demo
MCP server), the ASGI application in
this process (httpx2's `ASGITransport`), one agent calling ``echo`` back to back (``--mcp``:
through the MCP endpoint, on one open session of the SDK's client); the figures are per call,
averaged over the calls after a warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time

from bench import harness

BODY = {"server": harness.SERVER_NAME, "tool": "echo", "arguments": {"text": "hi"}}


class Counter:
    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        self.statements, self.writes, self.commits, self.hops = 0, 0, 0, 0
        self.sql = []
        # PostgreSQL only: what the driver sends (Django's statements and any of its own), and
        # the connections taken from Django's pool and given back to it
        self.driver_statements, self.getconns, self.putconns = 0, 0, 0

    def patch(self):
        from django.db.backends.base.base import BaseDatabaseWrapper
        from django.db.backends.utils import CursorWrapper

        counter = self
        execute = CursorWrapper._execute
        commit = BaseDatabaseWrapper.commit
        run_in_executor = asyncio.BaseEventLoop.run_in_executor

        def counted_execute(self, sql, params, *ignored):
            with counter.lock:
                counter.statements += 1
                counter.writes += sql.lstrip().split(" ", 1)[0].upper() in WRITES
                counter.sql.append(sql[:90])
            return execute(self, sql, params, *ignored)

        def counted_commit(self):
            with counter.lock:
                counter.commits += 1
            return commit(self)

        def counted_run_in_executor(self, executor, func, *args):
            counter.hops += 1
            counter.sql.append("hop: " + repr(func)[:80])
            return run_in_executor(self, executor, func, *args)

        CursorWrapper._execute = counted_execute
        BaseDatabaseWrapper.commit = counted_commit
        asyncio.BaseEventLoop.run_in_executor = counted_run_in_executor

    def patch_postgres(self):
        import psycopg
        import psycopg_pool

        counter = self
        cursor_execute = psycopg.Cursor.execute
        getconn = psycopg_pool.ConnectionPool.getconn
        putconn = psycopg_pool.ConnectionPool.putconn

        def counted_cursor_execute(self, query, *args, **kwargs):
            with counter.lock:
                counter.driver_statements += 1
                counter.sql.append("driver: " + str(query)[:80])
            return cursor_execute(self, query, *args, **kwargs)

        def counted_getconn(self, *args, **kwargs):
            with counter.lock:
                counter.getconns += 1
                counter.sql.append("pool: getconn")
            return getconn(self, *args, **kwargs)

        def counted_putconn(self, conn):
            with counter.lock:
                counter.putconns += 1
                counter.sql.append("pool: putconn")
            return putconn(self, conn)

        psycopg.Cursor.execute = counted_cursor_execute
        psycopg_pool.ConnectionPool.getconn = counted_getconn
        psycopg_pool.ConnectionPool.putconn = counted_putconn


WRITES = {"INSERT", "UPDATE", "DELETE"}


async def _calls(counter, token, warmup, calls):
    import httpx2

    from config.asgi import application

    transport = httpx2.ASGITransport(app=application)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(
        transport=transport, base_url="http://127.0.0.1", headers=headers, timeout=60
    ) as http:
        for i in range(warmup + calls):
            if i == warmup:
                counter.reset()
                cpu = time.process_time()
            response = await http.post("/api/v1/tool-calls", params={"wait": 30}, json=BODY)
            if response.status_code != 201 or response.json()["status"] != "succeeded":
                raise harness.BenchError(f"The call did not succeed: {response.text[:300]}")
            if i == warmup:
                first = list(counter.sql)
        counter.cpu_ms = (time.process_time() - cpu) * 1000 / calls
    return first


async def _mcp_calls(counter, token, warmup, calls):
    """The same call through the MCP endpoint (`/mcp/demo/`), on one open 2026-07-28 session of
    the SDK's client, with the endpoint's session manager running as in the web process."""
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    from config.asgi import application, mcp_application

    transport = httpx2.ASGITransport(app=application)
    headers = {"Authorization": f"Bearer {token}"}
    http = httpx2.AsyncClient(
        transport=transport, base_url="http://127.0.0.1", headers=headers, timeout=60
    )
    url = f"http://127.0.0.1/mcp/{harness.SERVER_NAME}/"
    session = Client(streamable_http_client(url, http_client=http))
    async with mcp_application.running(), http, session as client:
        for i in range(warmup + calls):
            if i == warmup:
                counter.reset()
                cpu = time.process_time()
            result = await client.call_tool("echo", BODY["arguments"])
            if result.is_error or result.content[0].text != BODY["arguments"]["text"]:
                raise harness.BenchError(f"The call did not succeed: {result!r}")
            if i == warmup:
                first = list(counter.sql)
        counter.cpu_ms = (time.process_time() - cpu) * 1000 / calls
    return first


def run(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.counts", description=__doc__)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--sql", action="store_true", help="print one call's statements and hops")
    parser.add_argument(
        "--mcp", action="store_true", help="call through the MCP endpoint instead of the JSON API"
    )
    parser.add_argument(
        "--no-debug",
        action="store_true",
        help="DEBUG off once Django is set up, as in production: no query log "
        "(the bench's Toolgate runs with DEBUG on)",
    )
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="the database in a throw-away PostgreSQL database (bench.harness.POSTGRES_URL), "
        "with Django's pool as configured; also counts the driver's statements and the pool's "
        "getconn/putconn",
    )
    options = parser.parse_args(argv)
    if options.postgres and not harness.postgres_answers():
        raise harness.BenchError(f"No PostgreSQL answers on {harness.POSTGRES_URL}")
    with harness.Toolgate("no_approval", postgres=options.postgres) as toolgate:
        if options.no_debug:
            from django.conf import settings

            settings.DEBUG = False
        counter = Counter()
        counter.patch()
        if options.postgres:
            counter.patch_postgres()
        calls = _mcp_calls if options.mcp else _calls
        first = asyncio.run(calls(counter, toolgate.token, options.warmup, options.calls))
        n = options.calls
        figures = {
            "statements": counter.statements / n,
            "writes": counter.writes / n,
            "commits": counter.commits / n,
            "hops": counter.hops / n,
            "cpu_ms": counter.cpu_ms,
        }
        if options.postgres:
            figures["driver_statements"] = counter.driver_statements / n
            figures["getconn"] = counter.getconns / n
            figures["putconn"] = counter.putconns / n
    what = "MCP tools/call on /mcp/demo/" if options.mcp else "POST /api/v1/tool-calls?wait=30"
    print(
        f"per auto-approved {what} ({n} calls): "
        + ", ".join(f"{name} {value:.2f}" for name, value in figures.items())
    )
    if options.sql:
        print("\n".join(f"  {sql}" for sql in first))
    return figures


if __name__ == "__main__":
    harness.interrupt_on_signals()
    try:
        run(sys.argv[1:])
    except harness.BenchError as exc:
        sys.exit(f"counts: FAILED: {exc}")
