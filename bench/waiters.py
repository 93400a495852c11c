"""How many concurrent ``?wait`` requests one web process holds, and what they cost it.

The demo server is in Always Ask mode, so calls stay pending. The benchmark creates `--n`
pending calls through the API, then opens `--n` connections at once, each sending
``GET /api/v1/tool-calls/<id>?wait=<--wait>`` (raw asyncio streams: a request is in flight
once its bytes are written). It then watches the web process (uvicorn, one process; psutil,
children included) until it handles all of them (the ramp), holds them `--settle` seconds
more while sampling RSS, threads, open files, established connections and CPU time and timing
a plain ``GET`` (no wait) as another agent would see it, and counts the responses that came
back early (there should be none). Then it decides every call through the ORM
(`ToolCall.deny`, or `approve` with ``--decision approve``) and waits for every waiter to
return with the final status.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import time

import httpx2
import psutil

from bench import harness

STATUS_AFTER = {"deny": "denied", "approve": "succeeded"}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench waiters", description=__doc__)
    parser.add_argument("--n", type=int, default=500, help="concurrent waiters")
    parser.add_argument("--wait", type=float, default=20, help="the ?wait= of each request")
    parser.add_argument(
        "--settle",
        type=float,
        default=4,
        help="seconds to hold the waiters once the web process handles them all",
    )
    parser.add_argument("--decision", choices=sorted(STATUS_AFTER), default="deny")
    parser.add_argument(
        "--web-open-files",
        type=int,
        default=None,
        help="soft open-file limit of the web process (default: inherited, raised as needed)",
    )
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="a throw-away PostgreSQL database on 127.0.0.1:5432 instead of SQLite",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary var dir")
    args = parser.parse_args(argv)
    if not 1 <= args.n <= 5000:
        parser.error("--n must be 1..5000")
    if not 1 <= args.wait <= 60 or not 0 <= args.settle <= args.wait / 2:
        parser.error("--wait must be 1..60 and --settle at most half of it")
    return args


# ---- the web process -------------------------------------------------------------------------


def _sample(pid, port):
    """RSS (bytes), threads, open files and established connections of a process tree."""
    root = psutil.Process(pid)
    processes = [root, *root.children(recursive=True)]
    rss = threads = fds = 0
    cpu = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error), process.oneshot():
            rss += process.memory_info().rss
            threads += process.num_threads()
            fds += process.num_fds()
            times = process.cpu_times()
            cpu += times.user + times.system
    connections = 0
    with contextlib.suppress(psutil.Error):
        connections = sum(
            1
            for c in root.net_connections(kind="tcp")
            if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port
        )
    return {"rss": rss, "threads": threads, "fds": fds, "connections": connections, "cpu": cpu}


# ---- the waiters -----------------------------------------------------------------------------


class Waiter:
    def __init__(self, call_id):
        self.call_id = call_id
        self.sent_at = None
        self.received_at = None
        self.http_status = None
        self.call_status = None
        self.error = None


async def _open(waiter, port, token, wait, sent):
    """Open a connection and send the request; the reader is returned for `_finish`."""
    reader, writer = await asyncio.open_connection(harness.HOST, port)
    request = (
        f"GET /api/v1/tool-calls/{waiter.call_id}?wait={wait:g} HTTP/1.1\r\n"
        f"Host: {harness.HOST}:{port}\r\n"
        f"Authorization: Bearer {token}\r\n"
        "Connection: close\r\n\r\n"
    )
    writer.write(request.encode())
    await writer.drain()
    waiter.sent_at = time.monotonic()
    sent.append(waiter)
    return reader, writer


async def _finish(waiter, connection, deadline):
    reader, writer = connection
    try:
        raw = await asyncio.wait_for(reader.read(), max(deadline - time.monotonic(), 0.1))
        waiter.received_at = time.monotonic()
        head, _, body = raw.partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        waiter.http_status = int(status_line.split()[1]) if status_line else None
        if waiter.http_status == 200:
            waiter.call_status = json.loads(body)["status"]
        else:
            waiter.error = f"HTTP {waiter.http_status}"
    except TimeoutError:
        waiter.error = "no response in time"
    except (OSError, ValueError, IndexError, KeyError) as exc:
        waiter.received_at = waiter.received_at or time.monotonic()
        waiter.error = type(exc).__name__
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _hold_and_decide(toolgate, call_ids, args):
    """Run the waiters; returns the figures."""
    loop_deadline = time.monotonic() + args.wait + 60
    waiters = [Waiter(call_id) for call_id in call_ids]
    sent = []
    started = time.monotonic()
    opened = await asyncio.gather(
        *(_open(w, toolgate.port, toolgate.token, args.wait, sent) for w in waiters),
        return_exceptions=True,
    )
    all_sent = time.monotonic()
    tasks = []
    for waiter, connection in zip(waiters, opened, strict=True):
        if isinstance(connection, BaseException):
            waiter.error = f"connect: {type(connection).__name__}"
            continue
        tasks.append(asyncio.create_task(_finish(waiter, connection, loop_deadline)))
    print(f"  {len(sent)} requests sent in {all_sent - started:.2f} s", flush=True)
    pid, port = toolgate.web.pid, toolgate.port
    peak = {"rss": 0, "threads": 0, "fds": 0, "connections": 0}

    async def sample():
        harness.check_interrupted()
        figures = await asyncio.to_thread(_sample, pid, port)
        for key in peak:
            peak[key] = max(peak[key], figures[key])
        return figures

    # Ramp: until the web process has handled every request, that is, until it holds all
    # the connections and has gone quiet (under a tenth of a core for two samples in a row):
    # each request's start (the agent's and the call's lookups) is done, and what is left is
    # waiting. (A waiter holds no thread, so the thread count says nothing.)
    ramp_until = all_sent + args.wait / 2
    ramp_seconds, quiet = None, 0
    last_cpu, last_at = None, None
    while time.monotonic() < ramp_until:
        figures = await sample()
        now = time.monotonic()
        if last_cpu is not None and figures["connections"] >= len(sent):
            busy = (figures["cpu"] - last_cpu) / (now - last_at)
            quiet = quiet + 1 if busy < 0.1 else 0
            if quiet >= 2:
                ramp_seconds = now - all_sent
                break
        last_cpu, last_at = figures["cpu"], now
        await asyncio.sleep(0.1)
    print(
        f"  handled by the web process after {ramp_seconds or args.wait / 2:.2f} s; "
        f"holding them {args.settle:g} s more ...",
        flush=True,
    )

    # Steady state: sample, and time a plain GET (no wait) as another agent would see it.
    settle_start = time.monotonic()
    cpu_start = (await sample())["cpu"]
    probe_times = []
    async with httpx2.AsyncClient(
        base_url=toolgate.base_url, headers=toolgate.auth, timeout=args.wait
    ) as http:
        while time.monotonic() < settle_start + args.settle:
            await sample()
            probe_times.append(await _probe(http, call_ids[0]))
            await asyncio.sleep(0.25)
    last = await sample()
    held_for = time.monotonic() - settle_start
    cpu_while_waiting = (last["cpu"] - cpu_start) / held_for if held_for > 0 else 0.0
    early = [w for w in waiters if w.received_at is not None]
    oldest_age = time.monotonic() - started
    if oldest_age > args.wait * 0.8:
        print(f"  warning: the oldest request is {oldest_age:.1f} s old; ?wait={args.wait:g}")

    # Decide every call.
    decide_start = time.monotonic()
    decided_at = await asyncio.to_thread(_decide_all, toolgate, call_ids, args.decision)
    decide_end = time.monotonic()
    print(
        f"  {args.decision} x{len(call_ids)} took {decide_end - decide_start:.2f} s; "
        "waiting for the responses ...",
        flush=True,
    )
    if tasks:
        await asyncio.wait(tasks, timeout=max(loop_deadline - time.monotonic(), 1))
    for task in tasks:
        task.cancel()
    after = await asyncio.to_thread(_sample, pid, port)

    expected = STATUS_AFTER[args.decision]
    late = [w for w in waiters if w not in early]
    completed = [
        w
        for w in late
        if w.received_at is not None and w.error is None and w.call_status == expected
    ]
    errors = {}
    for waiter in waiters:
        if waiter.error:
            errors[waiter.error] = errors.get(waiter.error, 0) + 1
        elif waiter.call_status != expected:
            key = f"status {waiter.call_status}"
            errors[key] = errors.get(key, 0) + 1
    notify = [w.received_at - decided_at[w.call_id] for w in completed]
    return {
        "sent": len(sent),
        "send_seconds": all_sent - started,
        "early": len(early),
        "with": last,
        "peak": peak,
        "after": after,
        "cpu_while_waiting": cpu_while_waiting,
        "ramp_seconds": ramp_seconds,
        "probe_with_ms": _median_ms(probe_times),
        "probe_with_max_ms": _max_ms(probe_times),
        "decide_seconds": decide_end - decide_start,
        "completed": len(completed),
        "errors": errors,
        "all_returned_after_first_decision": (
            max(w.received_at for w in completed) - decide_start if completed else None
        ),
        "all_returned_after_last_decision": (
            max(w.received_at for w in completed) - decide_end if completed else None
        ),
        "notify_median": statistics.median(notify) if notify else None,
        "notify_max": max(notify) if notify else None,
    }


async def _probe(http, call_id):
    """Seconds for one ``GET /api/v1/tool-calls/<id>`` without wait (NaN if it failed)."""
    start = time.perf_counter()
    try:
        response = await http.get(f"/api/v1/tool-calls/{call_id}")
    except httpx2.HTTPError:
        return float("nan")
    elapsed = time.perf_counter() - start
    return elapsed if response.status_code == 200 else float("nan")


def _median_ms(values):
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) * 1000 if values else None


def _max_ms(values):
    values = [v for v in values if v == v]
    return max(values) * 1000 if values else None


def _decide_all(toolgate, call_ids, decision):
    """Decide each call as an approver would; returns {call id: monotonic time decided}."""
    from django.db import connection

    from approvals.models import ToolCall

    decided = {}
    try:
        for call in ToolCall.objects.filter(pk__in=call_ids).order_by("pk"):
            harness.check_interrupted()
            if decision == "deny":
                ok = call.deny(toolgate.user, note="bench")
            else:
                ok = call.approve(toolgate.user, note="bench")
            decided[call.pk] = time.monotonic()
            if not ok:
                raise harness.BenchError(f"Could not {decision} call {call.pk}: {call.status}")
    finally:
        connection.close()
    return decided


async def _probes(toolgate, call_id, count):
    async with httpx2.AsyncClient(
        base_url=toolgate.base_url, headers=toolgate.auth, timeout=10
    ) as http:
        return _median_ms([await _probe(http, call_id) for _ in range(count)])


def _create_pending_calls(toolgate, n):
    body = {"server": harness.SERVER_NAME, "tool": "echo", "arguments": {"text": "hi"}}
    ids = []
    with httpx2.Client(base_url=toolgate.base_url, headers=toolgate.auth, timeout=30) as http:
        for _ in range(n):
            harness.check_interrupted()
            response = http.post("/api/v1/tool-calls", json=body)
            if response.status_code != 201 or response.json()["status"] != "pending_approval":
                raise harness.BenchError(
                    f"Creating a pending call: {response.status_code} {response.text[:300]}"
                )
            ids.append(response.json()["id"])
    return ids


# ---- the run ---------------------------------------------------------------------------------


def run(argv=()):
    args = parse_args(list(argv))
    # Each waiter is a socket here and in the web process, plus whatever the web process
    # opens per request (threads, database connections): leave plenty of room.
    limit = harness.raise_open_file_limit(4 * args.n + 1024)
    with harness.Toolgate("always_ask", keep=args.keep, postgres=args.postgres) as toolgate:
        toolgate.start_app(web_open_files=args.web_open_files)
        print(f"Waiters: {args.n} concurrent GET ?wait={args.wait:g} on one uvicorn process.")
        start = time.monotonic()
        call_ids = _create_pending_calls(toolgate, args.n)
        print(f"  {args.n} pending calls created in {time.monotonic() - start:.1f} s", flush=True)
        before = _sample(toolgate.web.pid, toolgate.port)
        probe_before = asyncio.run(_probes(toolgate, call_ids[0], 20))
        figures = asyncio.run(_hold_and_decide(toolgate, call_ids, args))
        journal = harness.journal_mode()
        harness.check_interrupted()
        toolgate.check_alive()
    results = {
        "n": args.n,
        "web_open_files": args.web_open_files or limit,
        "sqlite": journal,
        "wait": args.wait,
        "decision": args.decision,
        "before": before,
        "probe_before_ms": probe_before,
        **figures,
    }
    for line in report(results):
        print(line)
    return results


def _mb(value):
    return f"{value / 2**20:.1f} MB"


def report(results):
    before, with_, peak, after = (
        results["before"],
        results["with"],
        results["peak"],
        results["after"],
    )
    n = results["n"]

    def ms(value):
        return "-" if value is None else f"{value:.1f} ms"

    def seconds(value):
        return "-" if value is None else f"{value:.2f} s"

    errors = ", ".join(f"{k}: {v}" for k, v in sorted(results["errors"].items())) or "none"
    return [
        "",
        f"Concurrent ?wait={results['wait']:g} requests on one web process (uvicorn, 1 process;"
        f" {results['sqlite']}; open-file limit {results['web_open_files']}):",
        f"  waiters (N)                      {n} (sent {results['sent']} in "
        f"{results['send_seconds']:.2f} s)",
        f"  all being handled after          {seconds(results['ramp_seconds'])}",
        f"  responded before the decision    {results['early']}",
        f"  web RSS before / with / peak     {_mb(before['rss'])} / {_mb(with_['rss'])} / "
        f"{_mb(peak['rss'])}  (+{(with_['rss'] - before['rss']) / n / 1024:.0f} KB a waiter)",
        f"  web threads before / with / peak {before['threads']} / {with_['threads']} / "
        f"{peak['threads']}",
        f"  web open files before / with     {before['fds']} / {with_['fds']}",
        f"  established connections (with)   {with_['connections']}",
        f"  web CPU while holding them       {results['cpu_while_waiting'] * 100:.0f} % of a core",
        f"  another GET (no wait), median    {ms(results['probe_before_ms'])} before, "
        f"{ms(results['probe_with_ms'])} with them (max {ms(results['probe_with_max_ms'])})",
        f"  decision ({results['decision']} x{n}, ORM)       {results['decide_seconds']:.2f} s",
        f"  completed with the final status  {results['completed']} / {n}",
        f"  errors                           {errors}",
        "  all returned, after 1st decision "
        f"{seconds(results['all_returned_after_first_decision'])} "
        f"(after the last: {seconds(results['all_returned_after_last_decision'])})",
        f"  decision -> response per waiter  median {seconds(results['notify_median'])}, "
        f"max {seconds(results['notify_max'])}",
        f"  web after: RSS {_mb(after['rss'])}, threads {after['threads']}, "
        f"open files {after['fds']}",
    ]
