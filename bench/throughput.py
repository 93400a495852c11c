"""Sustained throughput: `concurrency` agents, each with its own token, sending auto-approved
``POST /api/v1/tool-calls?wait=30`` one after another for `seconds`, against a Toolgate that
`bench.harness.Toolgate.start_app` started. Reports calls a second, latency, and the CPU time
per call of each process (psutil: user + system, a worker's pool children included)."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time

import httpx2
import psutil

from bench import harness

BODY = {"server": harness.SERVER_NAME, "tool": "echo", "arguments": {"text": "hi"}}


def agent_tokens(toolgate, count):
    """`count` agents allowed on the demo server (made once per Toolgate), their tokens."""
    from integrations.models import Agent

    made = getattr(toolgate, "throughput_tokens", [])
    while len(made) < count:
        _, token = Agent.create_with_token(f"throughput-{len(made)}", [toolgate.server])
        made.append(token)
    toolgate.throughput_tokens = made
    return made[:count]


def _cpu_seconds(pid, children=True):
    """CPU seconds of `pid` (and its children) so far, 0 if it is gone."""
    total = 0.0
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        for process in [root, *(root.children(recursive=True) if children else [])]:
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                total += times.user + times.system
    return total


def _processes(toolgate):
    import os

    return {
        "web": toolgate.web.pid,
        "worker": toolgate.worker.pid,
        "mcp server": toolgate.mcp.pid,
        "bench client": os.getpid(),
    }


async def _agent(base_url, token, deadline, timings, errors):
    headers = {"Authorization": f"Bearer {token}"}
    timeout = httpx2.Timeout(60)
    async with httpx2.AsyncClient(base_url=base_url, headers=headers, timeout=timeout) as http:
        while time.monotonic() < deadline:
            harness.check_interrupted()
            start = time.perf_counter()
            response = await http.post("/api/v1/tool-calls", params={"wait": 30}, json=BODY)
            elapsed = time.perf_counter() - start
            ok = response.status_code == 201 and response.json()["status"] == "succeeded"
            (timings.append(elapsed) if ok else errors.append(response.text[:200]))


async def _run(base_url, tokens, seconds):
    timings, errors = [], []
    deadline = time.monotonic() + seconds
    agents = [_agent(base_url, token, deadline, timings, errors) for token in tokens]
    await asyncio.gather(*agents)
    return timings, errors


def measure(toolgate, concurrency=16, seconds=10.0, warmup=2.0):
    """Throughput figures (see the module docstring) after `warmup` seconds of the same load."""
    tokens = agent_tokens(toolgate, concurrency)
    asyncio.run(_run(toolgate.base_url, tokens, warmup))
    processes = _processes(toolgate)
    own = processes["bench client"]  # its children are the others
    before = {name: _cpu_seconds(pid, pid != own) for name, pid in processes.items()}
    started = time.perf_counter()
    timings, errors = asyncio.run(_run(toolgate.base_url, tokens, seconds))
    took = time.perf_counter() - started
    after = {name: _cpu_seconds(pid, pid != own) for name, pid in processes.items()}
    toolgate.check_alive()
    calls = len(timings)
    if not calls:
        raise harness.BenchError(f"No call succeeded under load: {errors[:3]}")
    return {
        "concurrency": concurrency,
        "seconds": took,
        "calls": calls,
        "errors": len(errors),
        "calls_per_s": calls / took,
        "median_ms": statistics.median(timings) * 1000,
        "p95_ms": harness.percentile(timings, 95) * 1000,
        "cpu_ms_per_call": {
            name: (after[name] - before[name]) * 1000 / calls for name in processes
        },
    }


def report_lines(label, figures):
    cpu = ", ".join(f"{name} {ms:.2f}" for name, ms in figures["cpu_ms_per_call"].items())
    return [
        f"  {label}: {figures['calls_per_s']:.0f} calls/s with {figures['concurrency']} agents "
        f"for {figures['seconds']:.0f} s ({figures['calls']} calls, {figures['errors']} errors), "
        f"median {figures['median_ms']:.1f} ms, p95 {figures['p95_ms']:.1f} ms",
        f"    CPU ms per call: {cpu}",
    ]
