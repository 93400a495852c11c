"""An A/B comparison in one run, for a machine whose speed drifts between runs (this project's
VMs: up to 2x minutes apart). One throw-away Toolgate (`bench.harness.Toolgate`, its web
process and worker), and calls interleaved round-robin between the cases, so that whatever the
machine does hits every case alike:

- `direct`: the SDK's `Client.call_tool("echo", …)` on one open session to the demo server;
- `api`: `POST /api/v1/tool-calls?wait=30`;
- `api[k=v]`, one per `--variant k=v` (or `k=v&k2=v2`): the same with these query parameters
  too, for an experiment in the web process to read (a temporary switch in the code under
  test; nothing in Toolgate reads them);
- `mcp` with `--mcp`: the call on one open session of the SDK's client on `/mcp/demo/`.

``python -m bench.ab [--calls 300] [--variant exp=1] [--mcp] [--postgres] [--broker URL]``
prints each case's median and p95 and their ratios to the direct call.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time

import httpx2

from bench import harness

ARGUMENTS = {"text": "hi"}
WARMUP = 20


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    parser.add_argument("--calls", type=int, default=300, help="timed calls per case")
    parser.add_argument("--variant", action="append", default=[], help="k=v[&k2=v2]")
    parser.add_argument("--mcp", action="store_true", help="add the MCP endpoint's case")
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL for the database")
    parser.add_argument("--broker", default="filesystem://", help="the Celery broker's URL")
    return parser.parse_args(argv)


async def _cases(toolgate, options, stack):
    """{case name: async function making one call}."""
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    direct = await stack.enter_async_context(Client(toolgate.mcp_url))
    http = await stack.enter_async_context(
        httpx2.AsyncClient(base_url=toolgate.base_url, headers=toolgate.auth, timeout=40)
    )
    body = {"server": harness.SERVER_NAME, "tool": "echo", "arguments": ARGUMENTS}

    def api(params):
        async def call():
            response = await http.post("/api/v1/tool-calls", params=params, json=body)
            if response.status_code != 201 or response.json()["status"] != "succeeded":
                raise harness.BenchError(f"The API call did not succeed: {response.text[:300]}")

        return call

    cases = {"direct": lambda: direct.call_tool("echo", ARGUMENTS), "api": api({"wait": 30})}
    for variant in options.variant:
        extra = dict(pair.split("=", 1) for pair in variant.split("&"))
        cases[f"api[{variant}]"] = api({"wait": 30, **extra})
    if options.mcp:
        url = f"{toolgate.base_url}/mcp/{harness.SERVER_NAME}/"
        mcp_http = await stack.enter_async_context(
            httpx2.AsyncClient(headers=toolgate.auth, timeout=40)
        )
        session = await stack.enter_async_context(
            Client(streamable_http_client(url, http_client=mcp_http))
        )
        cases["mcp"] = lambda: session.call_tool("echo", ARGUMENTS)
    return cases


async def _measure(toolgate, options):
    async with contextlib.AsyncExitStack() as stack:
        cases = await _cases(toolgate, options, stack)
        timings = {name: [] for name in cases}
        for i in range(WARMUP + options.calls):
            harness.check_interrupted()
            for name, call in cases.items():
                start = time.perf_counter()
                await call()
                if i >= WARMUP:
                    timings[name].append(time.perf_counter() - start)
    return timings


def report(timings):
    direct = timings["direct"]
    lines = []
    for name, values in timings.items():
        median, p95 = statistics.median(values), harness.percentile(values, 95)
        lines.append(
            f"  {name:24s} median {median * 1000:6.2f} ms  p95 {p95 * 1000:6.2f} ms  "
            f"{median / statistics.median(direct):4.2f}x / "
            f"{p95 / harness.percentile(direct, 95):4.2f}x the direct call"
        )
    return "\n".join(lines)


def run(argv=()):
    options = parse_args(argv)
    with harness.Toolgate("no_approval", postgres=options.postgres) as toolgate:
        toolgate.start_app(options.broker)
        try:
            timings = asyncio.run(_measure(toolgate, options))
        finally:
            toolgate.stop_app()
    print(f"A/B, {options.calls} calls per case, interleaved:\n{report(timings)}")


if __name__ == "__main__":
    harness.interrupt_on_signals()
    try:
        run(sys.argv[1:])
    except harness.BenchError as exc:
        sys.exit(f"ab: FAILED: {exc}")
