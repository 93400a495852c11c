"""``python -m bench [latency|waiters|click] [options]``.

Without a name, every benchmark runs, each in a process of its own (Django is set up once per
process, on that benchmark's own temporary var dir), and a summary follows. Options after a
name go to that benchmark: ``python -m bench latency --calls 500``,
``python -m bench waiters --n 1000``; ``python -m bench NAME --help`` lists them.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCHMARKS = ("latency", "waiters", "click")
ROOT = Path(__file__).resolve().parent.parent


def _module(name):
    if name == "latency":
        from bench import latency

        return latency
    if name == "click":
        from bench import click

        return click
    from bench import waiters

    return waiters


def run_one(name, argv):
    from bench import harness

    harness.interrupt_on_signals()
    json_path = None
    if "--json" in argv:  # used by run_all to collect the figures
        at = argv.index("--json")
        json_path = argv[at + 1]
        argv = argv[:at] + argv[at + 2 :]
    try:
        results = _module(name).run(argv)
    except harness.BenchError as exc:
        print(f"\n{name}: FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted; stopped everything it started.", file=sys.stderr)
        return 130
    if json_path:
        Path(json_path).write_text(json.dumps(results, default=str))
    return 0


def run_all():
    from bench import harness

    harness.interrupt_on_signals()
    outcomes = {}
    with tempfile.TemporaryDirectory(prefix="toolgate-bench-results-") as folder:
        for name in BENCHMARKS:
            json_path = os.path.join(folder, f"{name}.json")
            print(f"=== {name} ===", flush=True)
            started = time.monotonic()
            process = subprocess.Popen(
                [sys.executable, "-m", "bench", name, "--json", json_path], cwd=ROOT
            )
            try:
                code = process.wait(timeout=1800)
            except (KeyboardInterrupt, subprocess.TimeoutExpired):
                # The child got Ctrl-C too (same process group) and tears its set-up down.
                process.terminate()
                try:
                    process.wait(timeout=180)
                except subprocess.TimeoutExpired:
                    process.kill()
                print("Interrupted.", file=sys.stderr)
                return 130
            took = time.monotonic() - started
            results = json.loads(Path(json_path).read_text()) if code == 0 else None
            outcomes[name] = (code, results, took)
    print("\n=== summary ===")
    failed = 0
    for name, (code, results, took) in outcomes.items():
        if results is None:
            failed += 1
            print(f"\n{name}: FAILED (exit {code}) after {took:.0f} s")
            continue
        for line in _module(name).report(results):
            print(line)
        print(f"  ({name} took {took:.0f} s)")
    return 1 if failed else 0


def main(argv):
    if not argv:
        return run_all()
    if argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv[0] not in BENCHMARKS:
        print(f"Unknown benchmark {argv[0]!r}; choose from {', '.join(BENCHMARKS)}.")
        return 2
    return run_one(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
