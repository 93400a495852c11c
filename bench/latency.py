"""End-to-end latency of an auto-approved tool call through the agent API, against calling the
same tool directly with the `mcp` SDK.

Four cases, each `--calls` sequential calls of ``echo(text="hi")`` on the demo MCP server after
a short warm-up:

- direct, one open session: ``mcp.Client(url)`` opened once, ``call_tool`` repeated on it;
- direct, fresh session: a new ``mcp.Client(url)`` (connect + protocol negotiation) per call,
  which is what a Toolgate worker does for every call;
- API, file broker: ``POST /api/v1/tool-calls?wait=30`` until the call has succeeded, with the
  embedded defaults (SQLite, file broker, whose worker polls the queue every 0.2 s);
- API, Redis broker: the same with ``CELERY_BROKER_URL=redis://127.0.0.1:6379/14`` for web and
  worker, when Redis answers there (that database is flushed before and after);
- MCP endpoint: ``call_tool("echo", …)`` repeated on one ``mcp.Client`` session opened on
  Toolgate's ``/mcp/demo/`` with the agent's token (embedded defaults; an auto-approved call
  of a waiting agent runs in the web process, so no broker is involved);
- PostgreSQL + Redis: the direct cases, the API and the MCP endpoint again, in a process of
  their own (``--postgres``) whose Toolgate keeps its database in a throw-away PostgreSQL
  database, when PostgreSQL answers on 127.0.0.1:5432 and Redis on 127.0.0.1:6379.

After each API case, with the same web process and worker, `bench.throughput` measures
calls a second with ``--concurrency`` agents for ``--seconds``. A headline block prints each
target of issue 11 beside what was measured.

For the API cases the stored timestamps of each call split the time into: accept (request sent
-> call stored), queue (stored -> a worker claimed it), run (claimed -> result stored: a fresh
MCP session plus the call) and notify (result stored -> response received by the agent).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time

import anyio
import httpx2

from bench import harness, throughput

CALL_TIMEOUT = 30  # seconds, for any single call in any case
ARGUMENTS = {"text": "hi"}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench latency", description=__doc__)
    parser.add_argument("--calls", type=int, default=200, help="timed calls per case")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls first")
    parser.add_argument("--no-redis", action="store_true", help="skip the Redis broker case")
    parser.add_argument(
        "--no-postgres", action="store_true", help="skip the PostgreSQL + Redis cases"
    )
    parser.add_argument(
        "--postgres", action="store_true", help="only the PostgreSQL + Redis cases (a child run)"
    )
    parser.add_argument("--concurrency", type=int, default=16, help="agents for the throughput")
    parser.add_argument(
        "--seconds", type=float, default=10, help="throughput duration (0: no throughput)"
    )
    parser.add_argument(
        "--tests-helper",
        action="store_true",
        help="serve the demo MCP server through tests.mcp_servers.start unchanged (Nagle on)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary var dir")
    args = parser.parse_args(argv)
    if not 1 <= args.calls <= 100_000 or not 0 <= args.warmup <= 1000:
        parser.error("--calls must be 1..100000 and --warmup 0..1000")
    return args


# ---- direct calls with the SDK ---------------------------------------------------------------


def _check_direct(result):
    text = getattr(result.content[0], "text", None) if result.content else None
    if result.is_error or text != ARGUMENTS["text"]:
        raise harness.BenchError(f"Unexpected direct result: {result!r}")


async def _direct_open_session(url, calls, warmup):
    from mcp import Client

    with anyio.fail_after(CALL_TIMEOUT * (calls + warmup + 1)):
        async with Client(url) as client:
            return await _on_open_session(client, calls, warmup)


async def _on_open_session(client, calls, warmup):
    """Seconds each of `calls` echo calls took on an open session, after `warmup` calls."""
    timings = []
    for i in range(warmup + calls):
        harness.check_interrupted()
        start = time.perf_counter()
        with anyio.fail_after(CALL_TIMEOUT):
            result = await client.call_tool("echo", ARGUMENTS)
        elapsed = time.perf_counter() - start
        _check_direct(result)
        if i >= warmup:
            timings.append(elapsed)
    return timings


async def _direct_fresh_session(url, calls, warmup):
    from mcp import Client

    timings = []
    for i in range(warmup + calls):
        harness.check_interrupted()
        start = time.perf_counter()
        with anyio.fail_after(CALL_TIMEOUT):
            async with Client(url) as client:
                result = await client.call_tool("echo", ARGUMENTS)
        elapsed = time.perf_counter() - start
        _check_direct(result)
        if i >= warmup:
            timings.append(elapsed)
    return timings


# ---- calls through the MCP endpoint ---------------------------------------------------------


async def _mcp_open_session(toolgate, calls, warmup):
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    url = f"{toolgate.base_url}/mcp/{harness.SERVER_NAME}/"
    http = httpx2.AsyncClient(headers=toolgate.auth, timeout=CALL_TIMEOUT)
    with anyio.fail_after(CALL_TIMEOUT * (calls + warmup + 1)):
        async with http, Client(streamable_http_client(url, http_client=http)) as client:
            return await _on_open_session(client, calls, warmup)


# ---- calls through the API -------------------------------------------------------------------


def _api_calls(toolgate, calls, warmup):
    """Timed calls through the API: (seconds each, [(call id, wall-clock sent, received)])."""
    body = {"server": harness.SERVER_NAME, "tool": "echo", "arguments": ARGUMENTS}
    timings, marks = [], []
    timeout = httpx2.Timeout(CALL_TIMEOUT + 10)
    with httpx2.Client(base_url=toolgate.base_url, headers=toolgate.auth, timeout=timeout) as http:
        for i in range(warmup + calls):
            harness.check_interrupted()
            sent_wall = time.time()
            start = time.perf_counter()
            response = http.post("/api/v1/tool-calls", params={"wait": 30}, json=body)
            call = _json(response, 201)
            for _ in range(3):  # `wait` ran out first: wait again, a bounded number of times
                if call["status"] not in ("approved", "running"):
                    break
                response = http.get(f"/api/v1/tool-calls/{call['id']}", params={"wait": 30})
                call = _json(response, 200)
            elapsed = time.perf_counter() - start
            received_wall = time.time()
            if call["status"] != "succeeded" or call["result"]["content"][0]["text"] != "hi":
                toolgate.check_alive()
                raise harness.BenchError(f"The API call did not succeed: {call}")
            if i >= warmup:
                timings.append(elapsed)
                marks.append((call["id"], sent_wall, received_wall))
    return timings, marks


def _json(response, expected_status):
    if response.status_code != expected_status:
        raise harness.BenchError(f"API answered {response.status_code}: {response.text[:500]}")
    return response.json()


def _breakdown(marks):
    """Median milliseconds of each phase of the API calls, from the stored timestamps."""
    from approvals.models import ToolCall

    ids = [call_id for call_id, _, _ in marks]
    rows = {
        row["pk"]: row
        for row in ToolCall.objects.filter(pk__in=ids).values(
            "pk", "requested_at", "started_at", "finished_at"
        )
    }
    phases = {"accept": [], "queue": [], "run": [], "notify": []}
    for call_id, sent, received in marks:
        row = rows[call_id]
        if row["finished_at"] is None:  # with REPLY_BEFORE_RECORD, a record may still be going
            continue
        requested = row["requested_at"].timestamp()
        started = row["started_at"].timestamp()
        finished = row["finished_at"].timestamp()
        phases["accept"].append(requested - sent)
        phases["queue"].append(started - requested)
        phases["run"].append(finished - started)
        phases["notify"].append(received - finished)
    return {name: statistics.median(values) * 1000 for name, values in phases.items()}


# ---- the run ---------------------------------------------------------------------------------


def _stats(timings):
    harness.check_interrupted()
    return {
        "calls": len(timings),
        "median_ms": statistics.median(timings) * 1000,
        "p95_ms": harness.percentile(timings, 95) * 1000,
        "mean_ms": statistics.fmean(timings) * 1000,
        "max_ms": max(timings) * 1000,
    }


def run(argv=()):
    args = parse_args(list(argv))
    results = {"calls": args.calls, "cases": {}, "breakdown": {}, "throughput": {}, "notes": []}
    if args.tests_helper:
        results["notes"].append("demo MCP server via tests.mcp_servers.start (no TCP_NODELAY)")
    if args.postgres:
        brokers = [("api_pg", harness.REDIS_URL)]
    else:
        brokers = [("api_file", "filesystem://")]
        if args.no_redis:
            results["notes"].append("Redis case skipped (--no-redis).")
        elif harness.redis_answers():
            brokers.append(("api_redis", harness.REDIS_URL))
        else:
            results["notes"].append("Redis case skipped: nothing answers at 127.0.0.1:6379.")
    with harness.Toolgate(
        "no_approval", keep=args.keep, mcp_tests_helper=args.tests_helper, postgres=args.postgres
    ) as toolgate:
        _check_auto_approved(toolgate)
        where = "PostgreSQL + Redis" if args.postgres else harness.journal_mode()
        print(
            f"Latency ({where}): {args.calls} sequential echo calls a case, {args.warmup} warm-up."
        )
        results["hand_offs_us"] = harness.hand_offs()
        _direct_cases(toolgate.mcp_url, args, results["cases"])
        for name, broker in brokers:
            _app_cases(toolgate, name, broker, args, results)
    if not args.postgres:
        results["postgres"] = None if args.no_postgres else _postgres_run(argv, results["notes"])
    for line in report(results):
        print(line)
    return results


def _check_auto_approved(toolgate):
    from approvals import policy
    from integrations.models import Tool

    echo = Tool.objects.select_related("server").get(server=toolgate.server, name="echo")
    decision = policy.decide(None, echo)
    if decision.outcome != policy.Outcome.RUN:
        raise harness.BenchError(f"echo is not auto-approved: {decision.message}")


def _direct_cases(url, args, cases):
    print("  direct, one open session ...", flush=True)
    cases["direct_open"] = _stats(asyncio.run(_direct_open_session(url, args.calls, args.warmup)))
    print("  direct, fresh session per call ...", flush=True)
    cases["direct_fresh"] = _stats(asyncio.run(_direct_fresh_session(url, args.calls, args.warmup)))


def _app_cases(toolgate, name, broker, args, results):
    """The API (and, on the first app, the MCP endpoint) and the throughput on one app."""
    print(f"  {LABELS[name]} ...", flush=True)
    if broker.startswith("redis"):
        harness.flush_redis(broker)
    try:
        toolgate.start_app(broker)
        with _web_cpu(toolgate, args) as cpu:
            timings, marks = _api_calls(toolgate, args.calls, args.warmup)
        results["cases"][name] = {**_stats(timings), **cpu}
        results["breakdown"][name] = _breakdown(marks)
        if name in ("api_file", "api_pg"):
            print("  MCP endpoint, one open session ...", flush=True)
            with _web_cpu(toolgate, args) as cpu:
                mcp = asyncio.run(_mcp_open_session(toolgate, args.calls, args.warmup))
            results["cases"]["mcp_pg" if name == "api_pg" else "mcp_open"] = {**_stats(mcp), **cpu}
        if args.seconds > 0:
            print(f"  throughput, {args.concurrency} agents, {args.seconds:.0f} s ...", flush=True)
            results["throughput"][name] = throughput.measure(
                toolgate, args.concurrency, args.seconds
            )
    finally:
        toolgate.stop_app()
        if broker.startswith("redis"):
            harness.flush_redis(broker)


@contextlib.contextmanager
def _web_cpu(toolgate, args):
    """Fills the dict it yields with the web process's CPU (user + system) per call of the
    case run inside, warm-up calls included: `web_cpu_ms`."""
    import psutil

    web = psutil.Process(toolgate.web.pid)
    before = sum(web.cpu_times()[:2])
    figures = {}
    yield figures
    figures["web_cpu_ms"] = (sum(web.cpu_times()[:2]) - before) * 1000 / (args.calls + args.warmup)


def _postgres_run(argv, notes):
    """The PostgreSQL + Redis cases, in a child process (Django is set up once a process)."""
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    if not (harness.redis_answers() and harness.postgres_answers()):
        notes.append("PostgreSQL + Redis cases skipped: not both reachable on 127.0.0.1.")
        return None
    with tempfile.TemporaryDirectory(prefix="toolgate-bench-pg-") as folder:
        path = Path(folder) / "postgres.json"
        command = [sys.executable, "-m", "bench", "latency", "--postgres", "--json", str(path)]
        child = subprocess.run([*command, *argv], cwd=harness.ROOT, check=False)
        if child.returncode or not path.exists():
            raise harness.BenchError(f"The PostgreSQL + Redis run failed (exit {child.returncode})")
        return json.loads(path.read_text())


LABELS = {
    "direct_open": "direct SDK, one open session",
    "direct_fresh": "direct SDK, fresh session per call",
    "api_file": "API ?wait=30, file broker",
    "api_redis": "API ?wait=30, Redis broker",
    "mcp_open": "MCP /mcp/demo/, one open session",
    "api_pg": "API ?wait=30, PostgreSQL + Redis",
    "mcp_pg": "MCP /mcp/demo/, PostgreSQL + Redis",
}

# Issue 11's targets for a call of an agent that waits, as ratios to the direct call on an
# open session, and the throughput.
MAX_MEDIAN_RATIO, MAX_P95_RATIO, MIN_CALLS_PER_S = 3.0, 4.0, 200


def report(results, title="Latency of one echo call"):
    cases = results["cases"]
    lines = [
        "",
        f"{title}, {results['calls']} sequential calls per case (ms):",
        f"  {'case':<36} {'median':>8} {'p95':>8} {'/open':>8} {'p95/open':>9} {'/fresh':>8}"
        f" {'web CPU':>8}",
    ]
    for name, label in LABELS.items():
        if name not in cases:
            continue
        stats = cases[name]
        row = f"  {label:<36} {stats['median_ms']:8.1f} {stats['p95_ms']:8.1f}"
        if name.startswith(("api", "mcp")):
            open_ratio, p95_ratio = _ratios(cases, name)
            fresh_ratio = stats["median_ms"] / cases["direct_fresh"]["median_ms"]
            row += f" {open_ratio:7.1f}x {p95_ratio:8.1f}x {fresh_ratio:7.1f}x"
            if "web_cpu_ms" in stats:
                row += f" {stats['web_cpu_ms']:8.1f}"
        lines.append(row)
    lines.append(
        "  (ratios: Toolgate / direct on an open session, median and p95; / fresh session;"
        " web CPU: ms of the web process per call)"
    )
    if "hand_offs_us" in results:
        hand_offs = results["hand_offs_us"]
        lines.append(
            f"  (this machine: a hand-off to a thread and back {hand_offs['busy']:.0f} us back to"
            f" back, {hand_offs['idle']:.0f} us after 5 ms idle; a waited API call makes 8"
            " hand-offs, the direct call 2: see harness.hand_offs)"
        )
    for name, phases in results["breakdown"].items():
        parts = ", ".join(f"{phase} {ms:.1f}" for phase, ms in phases.items())
        lines.append(f"  {LABELS[name]}, median phases (ms): {parts}")
    for name, figures in results.get("throughput", {}).items():
        lines += throughput.report_lines(f"throughput, {LABELS[name]}", figures)
    lines.extend(f"  note: {note}" for note in results["notes"])
    if results.get("postgres"):
        lines += report(results["postgres"], "The same on PostgreSQL + Redis")[1:]
    if "postgres" in results:  # the top-level run: the targets for every case
        lines += headline(results)
    return lines


def _ratios(cases, name):
    direct = cases["direct_open"]
    return (
        cases[name]["median_ms"] / direct["median_ms"],
        cases[name]["p95_ms"] / direct["p95_ms"],
    )


def headline(results):
    """Each target of issue 11 beside its measured figure."""
    lines = ["", "Targets (issue 11), measured in this run:"]
    runs = [results, *([results["postgres"]] if results.get("postgres") else [])]

    def row(label, measured, target, met):
        lines.append(f"  {'met ' if met else 'MISS'} {label:<52} {measured:>9} (target {target})")

    for run in runs:
        for name in ("api_file", "api_redis", "mcp_open", "api_pg", "mcp_pg"):
            if name not in run["cases"]:
                continue
            median, p95 = _ratios(run["cases"], name)
            row(f"{LABELS[name]}, median", f"{median:.1f}x", f"<= {MAX_MEDIAN_RATIO:.0f}x",
                median <= MAX_MEDIAN_RATIO)  # fmt: skip
            row(f"{LABELS[name]}, p95", f"{p95:.1f}x", f"<= {MAX_P95_RATIO:.0f}x",
                p95 <= MAX_P95_RATIO)  # fmt: skip
        for name, figures in run.get("throughput", {}).items():
            rate = figures["calls_per_s"]
            row(f"calls/s, {figures['concurrency']} agents, {LABELS[name].split(', ')[-1]}",
                f"{rate:.0f}", f">= {MIN_CALLS_PER_S}", rate >= MIN_CALLS_PER_S)  # fmt: skip
    if len(runs) == 1:
        lines.append("  (no PostgreSQL + Redis figures in this run)")
    return lines
