"""``python -m bench.validation``: what argument validation costs, and what an attack on it does
to another agent's requests.

Part 1, in this process: the median time to check arguments against an ordinary schema, and
how the three attacks of issue 9 scale, for
  * "before": jsonschema as Toolgate used it before (Python `re`, its own `uniqueItems`, a
    fresh validator and `check_schema` on every call, no deadline),
  * "now": `approvals.validation.validate_arguments` (RE2, linear `uniqueItems`, cached
    validators, the deadline),
  * "jsonschema-rs" (Rust), measured as the alternative,
  * a round trip to a process pool, the price of isolating validation in another process.
Part 2, end to end (bench/harness.py: uvicorn + worker on a throw-away var dir): another
agent's `GET /api/v1/tools` and `POST /api/v1/tool-calls` latency, alone and while an attacker
sends each attack over 4 connections without pause.
"""

import argparse
import json
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import jsonschema
from referencing import Registry

ORDINARY = {
    "type": "object",
    "properties": {
        "text": {"type": "string", "maxLength": 100},
        "count": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
        "mode": {"enum": ["fast", "slow"]},
    },
    "required": ["text"],
    "additionalProperties": False,
}
ORDINARY_ARGS = {"text": "hello", "count": 3, "tags": ["a", "b"], "mode": "fast"}
CATASTROPHIC = {"type": "object", "properties": {"q": {"type": "string", "pattern": "^(a+)+$"}}}
UNIQUE = {"type": "object", "properties": {"q": {"type": "array", "uniqueItems": True}}}


def fan_out(depth):
    defs = {f"d{i}": {"allOf": [{"$ref": f"#/$defs/d{i + 1}"}] * 2} for i in range(depth)}
    defs[f"d{depth}"] = {"type": "string"}
    return {"type": "object", "properties": {"q": {"$ref": "#/$defs/d0"}}, "$defs": defs}


def mixed(count):
    return [str(i) if i % 2 else i for i in range(count)]


def before(arguments, schema):
    """Toolgate's validation before issue 9, as it was."""
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls.check_schema(schema)
    return list(cls(schema, registry=Registry()).iter_errors(arguments))


def now(arguments, schema, timeout=None):
    from approvals.validation import InvalidArguments, validate_arguments

    try:
        validate_arguments(arguments, schema, timeout=timeout)
    except InvalidArguments as exc:
        return exc.code
    return "valid"


def rust(arguments, schema):
    import jsonschema_rs

    return jsonschema_rs.validator_for(schema).is_valid(arguments)


def timed(function, *args, repeat=1):
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function(*args)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _in_process_pool(pool, arguments, schema):
    """The bare cost of handing the work to another process and back (pickling, a pipe)."""
    return pool.submit(json.dumps, [arguments, schema]).result()


def part_one():
    rows = []
    print("\n== ordinary schema, median per check ==")
    for name, function in [("before", before), ("now", now), ("jsonschema-rs", rust)]:
        function(ORDINARY_ARGS, ORDINARY)
        figure = timed(function, ORDINARY_ARGS, ORDINARY, repeat=2000)
        rows.append(("ordinary", name, figure))
        print(f"{name:>24}: {figure * 1e6:8.1f} µs")
    with ProcessPoolExecutor(max_workers=1) as pool:
        _in_process_pool(pool, ORDINARY_ARGS, ORDINARY)
        figure = timed(_in_process_pool, pool, ORDINARY_ARGS, ORDINARY, repeat=500)
    rows.append(("ordinary", "process pool round trip", figure))
    print(f"{'process pool round trip':>24}: {figure * 1e6:8.1f} µs (on top of the check)")

    print("\n== ^(a+)+$ against n x 'a' + '!' ==")
    for n in (18, 20, 22):
        figure = timed(before, {"q": "a" * n + "!"}, CATASTROPHIC)
        print(f"{'before':>24}: n={n}: {figure:8.3f} s (doubles with each character)")
    for n in (28, 100_000):
        for name, function in [("now", now), ("jsonschema-rs", rust)]:
            figure = timed(function, {"q": "a" * n + "!"}, CATASTROPHIC)
            print(f"{name:>24}: n={n}: {figure:8.4f} s")

    print("\n== uniqueItems over strings mixed with numbers ==")
    for count in (2_000, 4_000, 8_000):
        figure = timed(before, {"q": mixed(count)}, UNIQUE)
        print(f"{'before':>24}: {count:>6} items: {figure:8.3f} s (quadratic)")
    size = len(json.dumps(mixed(30_000)))
    for name, function in [("now", now), ("jsonschema-rs", rust)]:
        figure = timed(function, {"q": mixed(30_000)}, UNIQUE)
        print(f"{name:>24}: 30000 items ({size // 1000} KB): {figure:8.4f} s")

    print("\n== allOf of two $refs, nested `depth` times ==")
    for depth in (12, 14, 16):
        print(f"{'before':>24}: depth {depth}: {timed(before, {'q': 'x'}, fan_out(depth)):8.3f} s")
    for depth in (20, 40):
        figure = timed(now, {"q": "x"}, fan_out(depth), 2.0)
        print(f"{'now':>24}: depth {depth}: {figure:8.3f} s (stopped at the 2 s deadline)")
    for depth in (16, 20, 24):
        figure = timed(rust, {"q": "x"}, fan_out(depth))
        print(f"{'jsonschema-rs':>24}: depth {depth}: {figure:8.3f} s (no deadline possible)")
    return rows


# Part 2 --------------------------------------------------------------------------------------


def part_two(samples):
    import httpx2

    from bench.harness import Toolgate

    with Toolgate("always_ask") as gate:
        attacker = _evil_tools(gate)
        gate.start_app()
        attacks = {
            "regex ^(a+)+$, 5000 a's": ("catastrophic", {"q": "a" * 5_000 + "!"}),
            "uniqueItems, 30000 mixed": ("unique", {"q": [*mixed(30_000), 8]}),
            "$ref/allOf fan-out, depth 40": ("fan_out", {"q": "x"}),
        }
        print("\n== another agent's requests (median / p95 ms) ==")
        base = _other_agent(gate, samples, httpx2)
        print(f"{'no attack':>30}: {_figures(base)}")
        for label, (tool, arguments) in attacks.items():
            stop, answers = threading.Event(), []
            threads = [
                threading.Thread(
                    target=_attack, args=(gate, attacker, tool, arguments, stop, answers, httpx2)
                )
                for _ in range(4)
            ]
            for thread in threads:
                thread.start()
            time.sleep(1.0)
            figures = _other_agent(gate, samples, httpx2)
            stop.set()
            for thread in threads:
                thread.join()
            codes = sorted({code for code, _ in answers})
            took = statistics.median(seconds for _, seconds in answers) if answers else 0
            print(
                f"{label:>30}: {_figures(figures)}   (GET x{figures[0] / base[0]:.1f}, POST "
                f"x{figures[2] / base[2]:.1f}; attack answered {codes} in {took:.2f} s, "
                f"{len(answers)} times)"
            )


def _figures(figures):
    get, get95, post, post95 = figures
    return f"GET {get:6.1f} / {get95:6.1f}   POST {post:6.1f} / {post95:6.1f}"


def _evil_tools(gate):
    from django.utils import timezone

    from integrations.models import Agent, McpServer, Tool

    server = McpServer.objects.create(name="evil", url="https://mcp.example.com/mcp")
    for name, schema in [
        ("catastrophic", CATASTROPHIC),
        ("unique", UNIQUE),
        ("fan_out", fan_out(40)),
    ]:
        tool = Tool.objects.create_from_definition(
            server, {"name": name, "inputSchema": schema}, timezone.now()
        )
        tool.mark_reviewed(gate.user)
    _, token = Agent.create_with_token("attacker", [server])
    return token


def _attack(gate, token, tool, arguments, stop, answers, httpx2):
    with httpx2.Client(base_url=gate.base_url, timeout=120) as http:
        while not stop.is_set():
            started = time.perf_counter()
            response = http.post(
                "/api/v1/tool-calls",
                json={"server": "evil", "tool": tool, "arguments": arguments},
                headers={"Authorization": f"Bearer {token}"},
            )
            answers.append((response.status_code, time.perf_counter() - started))


def _other_agent(gate, samples, httpx2):
    gets, posts = [], []
    with httpx2.Client(base_url=gate.base_url, headers=gate.auth, timeout=120) as http:
        for _ in range(samples):
            started = time.perf_counter()
            http.get("/api/v1/tools").raise_for_status()
            gets.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            body = {"server": "demo", "tool": "echo", "arguments": {"text": "hi"}}
            http.post("/api/v1/tool-calls", json=body).raise_for_status()
            posts.append((time.perf_counter() - started) * 1000)
    return (
        statistics.median(gets),
        sorted(gets)[int(len(gets) * 0.95) - 1],
        statistics.median(posts),
        sorted(posts)[int(len(posts) * 0.95) - 1],
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100, help="requests per measurement")
    parser.add_argument("--skip-web", action="store_true", help="part 1 only")
    options = parser.parse_args()
    if options.skip_web:
        import os

        import django

        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
        django.setup()
        part_one()
        return
    from bench.harness import interrupt_on_signals

    interrupt_on_signals()
    # Part 2 sets Django up on its own var dir first; part 1 then runs in the same process.
    part_two(options.samples)
    part_one()


if __name__ == "__main__":
    main()
