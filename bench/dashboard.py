"""Time the dashboard, /metrics and the anomaly scan with 1,000,000 calls in the history.

    python -m bench.dashboard [--calls 1000000] [--days 30] [--repeat 5]

Runs in-process on a fresh SQLite database in a temporary folder (or on DATABASE_URL if set:
use a throwaway database), through Django's test client with a logged-in superuser, like
`bench/queue_pages.py`. The calls are spread evenly over the last `--days` days with a mix of
outcomes, decision and run times; `--days 7` puts the whole history inside the dashboard's
longest window (the worst case). Prints median and worst times.
"""

import argparse
import os
import statistics
import tempfile
import time

from bench.queue_pages import setup_django

# What becomes of calls, out of 100: 55 run on their own, 20 approved by a human, 8 denied,
# 7 blocked, 5 expire, 3 approved and failed, 1 unknown, 1 cancelled.


def populate(count, days):
    """The calls are written by one INSERT … SELECT over a generated series (the ORM takes
    ~10 minutes for a million on this machine); the mix of outcomes is the one above, by i % 100."""
    from django.contrib.auth.models import User
    from django.db import connection
    from django.utils import timezone

    from integrations.models import Agent, McpServer, Tool

    now = timezone.now()
    user = User.objects.create_superuser("bench", password="bench-pw-123")
    tools = []
    for i in range(5):
        server = McpServer.objects.create(name=f"server-{i}", url=f"https://s{i}.example/mcp")
        for j in range(4):
            definition = {"name": f"tool_{j}", "inputSchema": {"type": "object"}}
            tools.append(Tool.objects.create_from_definition(server, definition, now))
    agents = [Agent.objects.create(name=f"agent-{i}", token_hash=f"{i:064d}") for i in range(20)]
    started = time.perf_counter()
    with connection.cursor() as cursor:
        at = now.strftime("%Y-%m-%d %H:%M:%S.%f") if connection.vendor == "sqlite" else now
        cursor.execute(
            _insert_sql(connection.vendor, tools, agents, user), [count, at, count, days]
        )
    print(f"  created {count:,} calls over {days} days in {time.perf_counter() - started:.0f} s")
    return user


def _insert_sql(vendor, tools, agents, user):
    """One INSERT of n calls, call i requested (days * (n - i) / n) days before now."""
    if vendor == "sqlite":
        series = "WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i < %s - 1)"
        at = "strftime('%%Y-%%m-%%d %%H:%%M:%%f', julianday(p.now) + ({}) / 86400.0)"
        source = "FROM s, (SELECT %s AS now, %s AS n, %s AS days) p"
    else:
        series = "WITH s(i) AS (SELECT generate_series(0, %s - 1))"
        at = "(p.now + make_interval(secs => ({})))"
        source = "FROM s, (SELECT %s::timestamptz AS now, %s AS n, %s AS days) p"
    mod = "(i %% 100)"
    status = (
        f"CASE WHEN {mod} < 75 THEN 'succeeded' WHEN {mod} < 83 THEN 'denied' "
        f"WHEN {mod} < 90 THEN 'blocked' WHEN {mod} < 95 THEN 'expired' "
        f"WHEN {mod} < 98 THEN 'failed' WHEN {mod} < 99 THEN 'unknown' ELSE 'cancelled' END"
    )
    decided_by = (
        f"CASE WHEN {mod} < 55 THEN 'auto' WHEN {mod} < 83 THEN 'human' "
        f"WHEN {mod} < 90 THEN 'policy' WHEN {mod} < 95 THEN '' WHEN {mod} < 98 THEN 'human' "
        f"WHEN {mod} < 99 THEN 'auto' ELSE '' END"
    )
    human = f"({mod} BETWEEN 55 AND 82 OR {mod} BETWEEN 95 AND 97)"
    ran = f"({mod} < 75 OR {mod} BETWEEN 95 AND 98)"
    requested = "(-(p.days * 86400.0 * (p.n - i)) / p.n)"
    decision = f"({requested} + CASE WHEN {human} THEN 5 + ((i %% 10007) * 7919 %% 295) ELSE 0 END)"
    run = f"({decision} + 0.02 + ((i %% 10007) * 104729 %% 1950) / 1000.0)"
    tool_ids = " ".join(f"WHEN {k} THEN {t.pk}" for k, t in enumerate(tools))
    server_ids = " ".join(f"WHEN {k} THEN {t.server_id}" for k, t in enumerate(tools))
    server_names = " ".join(f"WHEN {k} THEN '{t.server.name}'" for k, t in enumerate(tools))
    tool_names = " ".join(f"WHEN {k} THEN '{t.name}'" for k, t in enumerate(tools))
    agent_ids = " ".join(f"WHEN {k} THEN {a.pk}" for k, a in enumerate(agents))
    pick_tool, pick_agent = f"(i %% {len(tools)})", f"((i * 31 + i / 7) %% {len(agents)})"
    return f"""
        {series}
        INSERT INTO approvals_toolcall (
            agent_id, server_id, tool_id, server_name, tool_name, tool_fingerprint, arguments,
            idempotency_key, status, decided_by, decided_by_user_id, decided_at, note, warnings,
            error_code, error_message, attempts, requested_at, started_at, finished_at,
            expires_at)
        SELECT
            CASE {pick_agent} {agent_ids} END, CASE {pick_tool} {server_ids} END,
            CASE {pick_tool} {tool_ids} END, CASE {pick_tool} {server_names} END,
            CASE {pick_tool} {tool_names} END, 'bench', '{{"q": "a question"}}', '',
            {status}, {decided_by}, CASE WHEN {human} THEN {user.pk} END,
            CASE WHEN {decided_by} <> '' THEN {at.format(decision)} END, '', '[]',
            CASE WHEN {mod} BETWEEN 95 AND 97 THEN 'timeout' ELSE '' END, '', 1,
            {at.format(requested)},
            CASE WHEN {ran} THEN {at.format(decision + " + 0.02")} END,
            CASE WHEN {ran} THEN {at.format(run)}
                 WHEN {mod} BETWEEN 90 AND 94 THEN {at.format(requested + " + 600")}
                 ELSE {at.format(decision)} END,
            {at.format(requested + " + 600")}
        {source}
    """


def timed(action, repeat):
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), max(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--keep", metavar="DIR", help="keep the SQLite database in DIR; reuse it when it exists"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="toolgate-bench-") as var_dir:
        os.environ["METRICS_TOKEN"] = "bench-metrics-token-0123456789"
        setup_django(args.keep or var_dir)
        from django.contrib.auth.models import User
        from django.db import connection
        from django.test import Client
        from django.test.utils import CaptureQueriesContext

        from approvals import anomalies, metrics

        user = User.objects.filter(username="bench").first()
        if user is None:
            print(f"Database: {connection.vendor}; populating…")
            user = populate(args.calls, args.days)
            with connection.cursor() as cursor:
                cursor.execute("ANALYZE")
        client = Client(HTTP_HOST="localhost")
        client.force_login(user)
        scrape = {"HTTP_AUTHORIZATION": "Bearer bench-metrics-token-0123456789"}

        def get(url, **headers):
            def action():
                response = client.get(url, **headers)
                assert response.status_code == 200, (url, response.status_code)

            return action

        def queries(action):
            with CaptureQueriesContext(connection) as captured:
                action()
            return len(captured)

        # The first scrape aggregates the whole history once to make the checkpoint.
        first = timed(get("/metrics", **scrape), 1)
        cases = {
            "dashboard, last 24 hours": get("/approvals/dashboard/"),
            "dashboard, last 7 days": get("/approvals/dashboard/?period=7d"),
            "dashboard, 7 days, one agent": get("/approvals/dashboard/?period=7d&agent=agent-7"),
            "dashboard, 7 days, one server": get("/approvals/dashboard/?period=7d&server=server-2"),
            "/metrics, after the checkpoint": get("/metrics", **scrape),
            "/metrics, whole history recounted": lambda: metrics.totals_between(None, None),
            "anomaly scan": anomalies.scan,
        }
        print(f"\n{'case':<40} {'median ms':>10} {'worst ms':>10} {'queries':>8}")
        print(f"{'/metrics, first scrape (checkpoint)':<40} {first[0]:>10.1f} {first[1]:>10.1f}")
        for label, action in cases.items():
            median, worst = timed(action, args.repeat)
            print(f"{label:<40} {median:>10.1f} {worst:>10.1f} {queries(action):>8}")


if __name__ == "__main__":
    main()
