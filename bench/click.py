"""A human's approval click -> the waiting agent has the result (issue 11's target: at most
50 ms plus the tool's own time).

The demo server is in Always Ask mode. For each of `--calls` sequential calls of
``echo(text="hi")``: the agent sends ``POST /api/v1/tool-calls`` (the call is pending), then
``GET /api/v1/tool-calls/<id>?wait=30`` on another connection, and once that waits an approver
sends the queue page's decision (``POST /approvals/<id>/decide``, ``decision=approve``, a
logged-in session with its CSRF token, as the page's button does). Timed: from sending the
click to the waiting agent receiving the final answer. The stored timestamps split it into
click (sent -> decided), queue (decided -> a worker claimed it), run (claimed -> result stored:
an MCP session and the call) and wake (result stored -> the agent has the answer).

The tool's own time is a direct call on an open MCP session to the same server (median), and
each case prints (click -> result - tool's time) / 50 ms: at most 1.0 meets the target.

Cases: the embedded defaults (SQLite, file broker); SQLite with a Redis broker
(``redis://127.0.0.1:6379/14`` under a key prefix of this run's own, removed after); and
PostgreSQL + Redis, when a PostgreSQL server answers at ``--postgres`` (a database of this
run's own, dropped after). The PostgreSQL case runs in a process of its own (Django is set up
once per process, on one database).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2

from bench import harness

TARGET_MS = 50.0
WAIT = 30
POSTGRES = "postgres://postgres@127.0.0.1:5432"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench click", description=__doc__)
    parser.add_argument("--calls", type=int, default=100, help="timed clicks per case")
    parser.add_argument("--warmup", type=int, default=5, help="untimed clicks first")
    parser.add_argument("--no-redis", action="store_true", help="skip the Redis cases")
    parser.add_argument("--postgres", default=POSTGRES, help="a PostgreSQL server (no database)")
    parser.add_argument("--no-postgres", action="store_true", help="skip PostgreSQL + Redis")
    parser.add_argument("--keep", action="store_true", help="keep the temporary var dir")
    parser.add_argument("--only-postgres", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 1 <= args.calls <= 100_000 or not 0 <= args.warmup <= 1000:
        parser.error("--calls must be 1..100000 and --warmup 0..1000")
    return args


# ---- an approver's session -------------------------------------------------------------------


def _approver_cookies(toolgate):
    """A logged-in session of an approver, made as the login page would, and a CSRF token."""
    from django.conf import settings
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
    from django.contrib.auth.models import Group
    from django.contrib.sessions.backends.db import SessionStore

    user = toolgate.user
    user.groups.add(Group.objects.get(name="Approvers"))
    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.create()
    csrf = secrets.token_hex(16)  # 32 characters: a valid unmasked CSRF secret
    return {settings.SESSION_COOKIE_NAME: session.session_key, settings.CSRF_COOKIE_NAME: csrf}


# ---- the clicks ------------------------------------------------------------------------------


async def _direct_tool_time(url, calls=50):
    """Median seconds of the tool itself: echo on an open session to the server."""
    from mcp import Client

    async with Client(url) as client:
        timings = []
        for _ in range(calls + 5):
            start = time.perf_counter()
            await client.call_tool("echo", {"text": "hi"})
            timings.append(time.perf_counter() - start)
    return statistics.median(timings[5:])


async def _clicks(toolgate, cookies, calls, warmup):
    base = toolgate.base_url
    limits = dict(timeout=WAIT + 10)
    agent = httpx2.AsyncClient(base_url=base, headers=toolgate.auth, **limits)
    waiter = httpx2.AsyncClient(base_url=base, headers=toolgate.auth, **limits)
    csrf = {"X-CSRFToken": cookies["csrftoken"], "Accept": "application/json"}
    human = httpx2.AsyncClient(base_url=base, cookies=cookies, headers=csrf, **limits)
    timings, marks = [], []
    async with agent, waiter, human:
        for i in range(warmup + calls):
            harness.check_interrupted()
            body = {"server": harness.SERVER_NAME, "tool": "echo", "arguments": {"text": "hi"}}
            call = _json(await agent.post("/api/v1/tool-calls", json=body), 201)
            if call["status"] != "pending_approval":
                raise harness.BenchError(f"echo did not wait for a human: {call}")
            waiting = asyncio.ensure_future(
                waiter.get(f"/api/v1/tool-calls/{call['id']}", params={"wait": WAIT})
            )
            await asyncio.sleep(0.05)  # the GET is in the web process's wait by now
            sent, sent_wall = time.perf_counter(), time.time()
            decided = await human.post(
                f"/approvals/{call['id']}/decide", data={"decision": "approve"}
            )
            _json(decided, 200)
            outcome = _json(await waiting, 200)
            took, received_wall = time.perf_counter() - sent, time.time()
            if outcome["status"] != "succeeded":
                raise harness.BenchError(f"The approved call ended {outcome['status']}: {outcome}")
            if i >= warmup:
                timings.append(took)
                marks.append((call["id"], sent_wall, received_wall))
    return timings, marks


def _json(response, expected):
    if response.status_code != expected:
        raise harness.BenchError(f"{response.request.url} answered {response.status_code}: "
                                 f"{response.text[:300]}")  # fmt: skip
    return response.json()


def _phases(marks):
    from approvals.models import ToolCall

    rows = {
        row["pk"]: row
        for row in ToolCall.objects.filter(pk__in=[m[0] for m in marks]).values(
            "pk", "decided_at", "started_at", "finished_at"
        )
    }
    phases = {"click": [], "queue": [], "run": [], "wake": []}
    for call_id, sent, received in marks:
        row = rows[call_id]
        decided, started = row["decided_at"].timestamp(), row["started_at"].timestamp()
        finished = row["finished_at"].timestamp()
        phases["click"].append(decided - sent)
        phases["queue"].append(started - decided)
        phases["run"].append(finished - started)
        phases["wake"].append(received - finished)
    return {name: statistics.median(values) * 1000 for name, values in phases.items()}


def _stats(timings, tool_ms):
    median = statistics.median(timings) * 1000
    p95 = harness.percentile(timings, 95) * 1000
    return {
        "calls": len(timings),
        "median_ms": median,
        "p95_ms": p95,
        "max_ms": max(timings) * 1000,
        "tool_ms": tool_ms,
        "median_ratio": (median - tool_ms) / TARGET_MS,
        "p95_ratio": (p95 - tool_ms) / TARGET_MS,
    }


# ---- the run ---------------------------------------------------------------------------------


def _cases(toolgate, args, brokers, results):
    cookies = _approver_cookies(toolgate)
    tool_ms = asyncio.run(_direct_tool_time(toolgate.mcp_url)) * 1000
    for name, broker, env in brokers:
        print(f"  {LABELS[name]} ...", flush=True)
        try:
            toolgate.start_app(broker, env=env)
            timings, marks = asyncio.run(_clicks(toolgate, cookies, args.calls, args.warmup))
        finally:
            toolgate.stop_app()
            if env.get("CELERY_BROKER_KEY_PREFIX"):
                _forget_redis_keys(broker, env["CELERY_BROKER_KEY_PREFIX"])
        results["cases"][name] = _stats(timings, tool_ms)
        results["phases"][name] = _phases(marks)


def _redis_env():
    return {"CELERY_BROKER_KEY_PREFIX": f"toolgate-bench-click-{os.getpid()}:"}


def _forget_redis_keys(url, prefix):
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def _postgres_answers(server):
    import psycopg

    try:
        psycopg.connect(f"{server}/postgres", connect_timeout=3).close()
    except Exception:
        return False
    return True


def run(argv=()):
    args = parse_args(list(argv))
    results = {"calls": args.calls, "cases": {}, "phases": {}, "notes": []}
    redis_ok = not args.no_redis and harness.redis_answers()
    if args.only_postgres:  # the PostgreSQL case, in a process of its own (see run_postgres)
        database = f"{args.postgres}/toolgate_bench_click_{os.getpid()}"
        with harness.Toolgate("always_ask", keep=args.keep, database_url=database) as toolgate:
            brokers = [("postgres_redis", harness.REDIS_URL, _redis_env())]
            _cases(toolgate, args, brokers, results)
        return results
    print(f"Approval click -> result: {args.calls} sequential clicks per case, "
          f"{args.warmup} warm-up.")  # fmt: skip
    with harness.Toolgate("always_ask", keep=args.keep) as toolgate:
        brokers = [("embedded", "filesystem://", {})]
        if redis_ok:
            brokers.append(("sqlite_redis", harness.REDIS_URL, _redis_env()))
        _cases(toolgate, args, brokers, results)
    if not redis_ok:
        results["notes"].append("Redis cases skipped (--no-redis, or nothing at 127.0.0.1:6379).")
    elif args.no_postgres:
        results["notes"].append("PostgreSQL + Redis skipped (--no-postgres).")
    elif not _postgres_answers(args.postgres):
        results["notes"].append(f"PostgreSQL + Redis skipped: nothing answers at {args.postgres}.")
    else:
        print(f"  {LABELS['postgres_redis']} ...", flush=True)
        results["cases"].update(run_postgres(args, results))
    for line in report(results):
        print(line)
    return results


def run_postgres(args, results):
    with tempfile.TemporaryDirectory(prefix="toolgate-bench-click-") as folder:
        out = Path(folder) / "postgres.json"
        command = [sys.executable, "-m", "bench", "click", "--only-postgres", "--json", str(out)]
        command += ["--calls", str(args.calls), "--warmup", str(args.warmup)]
        command += ["--postgres", args.postgres]
        done = subprocess.run(
            command, cwd=harness.ROOT, check=False, capture_output=True, text=True
        )
        if done.returncode:
            results["notes"].append(f"PostgreSQL + Redis failed: {done.stderr[-500:]}")
            return {}
        child = json.loads(out.read_text())
    results["phases"].update(child["phases"])
    return child["cases"]


LABELS = {
    "embedded": "embedded defaults (SQLite, file broker)",
    "sqlite_redis": "SQLite, Redis broker",
    "postgres_redis": "PostgreSQL + Redis",
}


def report(results):
    lines = [
        "",
        f"Approval click -> the waiting agent has the result, {results['calls']} clicks (ms);",
        f"target: at most {TARGET_MS:.0f} ms plus the tool's own time (ratio <= 1.0):",
        f"  {'case':<42} {'median':>7} {'p95':>7} {'tool':>6} {'ratio':>6} {'p95 ratio':>9}",
    ]
    for name, label in LABELS.items():
        stats = results["cases"].get(name)
        if not stats:
            continue
        lines.append(
            f"  {label:<42} {stats['median_ms']:7.1f} {stats['p95_ms']:7.1f} "
            f"{stats['tool_ms']:6.1f} {stats['median_ratio']:6.2f} {stats['p95_ratio']:9.2f}"
        )
    for name, phases in results["phases"].items():
        parts = ", ".join(f"{phase} {ms:.1f}" for phase, ms in phases.items())
        lines.append(f"  {LABELS[name]}, median phases (ms): {parts}")
    lines.extend(f"  note: {note}" for note in results["notes"])
    return lines
