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
# What `python -m bench` (make bench) runs each with: the waiters at the 1,000.
DEFAULTS = {"waiters": ("--n", "1000")}
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
            argv = [*DEFAULTS.get(name, ()), "--json", json_path]
            process = subprocess.Popen([sys.executable, "-m", "bench", name, *argv], cwd=ROOT)
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
    for line in targets(outcomes):
        print(line)
    return 1 if failed else 0


def targets(outcomes):
    """Every target of issue 11 beside what this run measured, in one block at the end: the
    latency and throughput rows of `latency.headline`, the approval click, and the waiters
    (none answered before its decision, every one back with the final status)."""
    from bench import click, latency

    def results(name):
        return outcomes.get(name, (None, None, None))[1]

    lines = ["", "=== targets (issue 11) ==="]
    if results("latency"):
        lines += latency.headline(results("latency"))[2:]
    else:
        lines.append("  MISS latency and throughput: the benchmark failed")
    if results("click"):
        for name, stats in results("click")["cases"].items():
            ratio = stats["median_ratio"]
            lines.append(
                f"  {'met ' if ratio <= 1.0 else 'MISS'} "
                f"{'click -> result, ' + click.LABELS[name] + ', median':<52} "
                f"{ratio:>8.2f}x (target <= 1.0x of {click.TARGET_MS:.0f} ms + the tool)"
            )
    else:
        lines.append("  MISS approval click: the benchmark failed")
    waiters = results("waiters")
    if waiters:
        n, completed, early = waiters["n"], waiters["completed"], waiters["early"]
        met = completed == n and early == 0 and not waiters["errors"]
        lines.append(
            f"  {'met ' if met else 'MISS'} {f'{n} waiters on one web process':<52} "
            f"{f'{completed}/{n}, {early} early':>9} (target: all back, none early, no errors)"
        )
    else:
        lines.append("  MISS waiters: the benchmark failed")
    return lines


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
