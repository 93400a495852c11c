"""What the web process spends on an API request outside the database and the upstream call:
the ASGI application driven in this process with a plain ``receive``/``send`` pair (no client,
no server), against a bare ASGI app answering the same bytes.

``python -m bench.edge [--rounds N] [--batch N] [--profile MODE]``: a throw-away Toolgate
(`bench.harness.Toolgate`, SQLite, DEBUG off as in production), then rounds of batches, the
modes interleaved within each round so the machine's drift hits them alike; per mode the
median over the rounds of the CPU per request (the event loop's thread: what is not database
work; and the whole process's, the database thread's included) and the Python function calls
per request in the loop (deterministic). Modes:

- ``bare``: the same 404's bytes from a ten-line ASGI app;
- ``nope``: `GET /api/v1/nope`, the API's 404 (no database);
- ``missing``: an authenticated `GET /api/v1/tool-calls/<missing id>` (the agent's hop, one
  SELECT more);
- ``found``: the same for one of the agent's calls (200, its JSON);
- ``found_view``: ``found``'s view called with a request made for it, without the handler,
  its middleware or the URL patterns: the difference to ``found`` is what those cost;
- ``bad``: `POST /api/v1/tool-calls` with a body that is not JSON (the agent's hop, the 400);
- ``waited``: the auto-approved `POST /api/v1/tool-calls?wait=30` of `bench.counts`, the
  upstream call included (its client's CPU is the loop's).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import statistics
import sys
import time

from bench import harness
from bench.counts import BODY

MODES = ("bare", "nope", "missing", "found", "found_view", "bad", "waited")


def _scope(method, path, token, body=b"", query=b""):
    headers = [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"bench"), (b"accept", b"*/*")]
    if token:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    if body:
        headers += [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "method": method,
        "root_path": "",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "headers": headers,
        "state": {},
    }


async def _request(app, scope, body=b""):
    """One request as uvicorn drives it: the body, then `http.disconnect` once the response
    has been sent (uvicorn's receive blocks until then)."""
    sent = []
    done = asyncio.Event()
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if messages:
            return messages.pop()
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()

    await app(dict(scope), receive, send)
    return sent


async def _call(application, token):
    """The id of a call the agent made: an auto-approved `echo`, run without waiting."""
    body = json.dumps(BODY).encode()
    sent = await _request(application, _scope("POST", "/api/v1/tool-calls", token, body), body)
    if sent[0]["status"] != 201:
        raise harness.BenchError(f"The call was not stored: {sent[1:]}")
    return json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["id"]


def _view_only(call_id):
    """`found`'s view called with a request made here, without the handler, its middleware
    or the URL patterns: the view's own cost (its two hops included)."""
    from django.core.handlers.asgi import ASGIRequest

    from approvals.api import START_IN_FIRST_HOP, tool_call

    async def app(scope, receive, send):
        await receive()
        START_IN_FIRST_HOP.set(True)  # request_started in its hop, as the handler has it
        response = await tool_call(ASGIRequest(scope, io.BytesIO()), call_id=call_id)
        assert response.status_code == 200 and response.content

    return app


def _bare(reference):
    start, body = reference[0], reference[1]

    async def app(scope, receive, send):
        await receive()
        await send(start)
        await send(body)

    return app


async def _run(token, rounds, batch, profile):
    from config.asgi import application

    call_id = await _call(application, token)
    body = json.dumps(BODY).encode()

    requests = {
        "nope": (_scope("GET", "/api/v1/nope", token), b""),
        "missing": (_scope("GET", "/api/v1/tool-calls/999999999", token), b""),
        "found": (_scope("GET", f"/api/v1/tool-calls/{call_id}", token), b""),
        "bad": (_scope("POST", "/api/v1/tool-calls", token, b"{nope"), b"{nope"),
        "waited": (_scope("POST", "/api/v1/tool-calls", token, body, b"wait=30"), body),
    }
    expected = {"nope": 404, "missing": 404, "found": 200, "bad": 400, "waited": 201}
    for mode, (scope, body) in requests.items():
        sent = await _request(application, scope, body)
        if sent[0]["status"] != expected[mode]:
            raise harness.BenchError(f"{mode}: {sent[0]['status']} {sent[1:]}")
    reference = await _request(application, *requests["nope"])
    apps = {"bare": _bare(reference), **{m: application for m in requests}}
    requests["bare"] = requests["nope"]
    apps["found_view"], requests["found_view"] = _view_only(call_id), requests["found"]
    cpu = {mode: [] for mode in MODES}
    loop_cpu = {mode: [] for mode in MODES}
    calls = {}
    for mode in MODES:  # warm-up, and the function calls per request
        for _ in range(20):
            await _request(apps[mode], *requests[mode])
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(50):
            await _request(apps[mode], *requests[mode])
        profiler.disable()
        stats = pstats.Stats(profiler)
        calls[mode] = stats.total_calls / 50
        if mode == profile:
            stats.sort_stats("tottime").print_stats(40)
    for _ in range(rounds):
        for mode in MODES:
            app, (scope, body) = apps[mode], requests[mode]
            started, loop_started = time.process_time(), time.thread_time()
            for _ in range(batch):
                await _request(app, scope, body)
            loop_cpu[mode].append((time.thread_time() - loop_started) * 1e6 / batch)
            cpu[mode].append((time.process_time() - started) * 1e6 / batch)
    print("µs of CPU a request, median over the rounds (min): the event loop's thread; all threads")
    for mode in MODES:
        loop, process = statistics.median(loop_cpu[mode]), statistics.median(cpu[mode])
        print(
            f"{mode:8s} loop {loop:7.1f} ({min(loop_cpu[mode]):7.1f}); "
            f"process {process:7.1f} ({min(cpu[mode]):7.1f}); "
            f"Python calls (loop) {calls[mode]:6.0f}"
        )


def run(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.edge", description=__doc__)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--profile", choices=MODES, help="print this mode's cProfile")
    options = parser.parse_args(argv)
    with harness.Toolgate("no_approval") as toolgate:
        from django.conf import settings

        settings.DEBUG = False
        asyncio.run(_run(toolgate.token, options.rounds, options.batch, options.profile))


if __name__ == "__main__":
    harness.interrupt_on_signals()
    try:
        run(sys.argv[1:])
    except harness.BenchError as exc:
        sys.exit(f"edge: FAILED: {exc}")
