"""Render the queue with 10,000 pending calls and the history with 1,000,000 rows.

    python -m bench.queue_pages [--pending 10000] [--history 1000000] [--repeat 5]

Runs in-process on a fresh SQLite database in a temporary folder (or on DATABASE_URL if set:
use a throwaway database), through Django's test client with a logged-in superuser, so the
figures are view + queries + template, without network. Prints median and worst times.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def setup_django(var_dir):
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ["TOOLGATE_VAR_DIR"] = var_dir
    os.environ.setdefault("DEBUG", "true")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def populate(pending, history):
    from django.contrib.auth.models import User
    from django.utils import timezone

    from approvals.models import DecidedBy, Status, ToolCall
    from integrations.models import Agent, McpServer, Tool

    now = timezone.now()
    user = User.objects.create_superuser("bench", password="bench-pw-123")
    servers = [
        McpServer.objects.create(name=f"server-{i}", url=f"https://s{i}.example/mcp")
        for i in range(5)
    ]
    tools = []
    for server in servers:
        for j in range(4):
            definition = {
                "name": f"tool_{j}",
                "description": "A tool used by the benchmark.",
                "inputSchema": {"type": "object", "properties": {"q": {"type": "string"}}},
                "annotations": {"readOnlyHint": j % 2 == 0, "destructiveHint": j % 2 == 1},
            }
            tools.append(Tool.objects.create_from_definition(server, definition, now))
    agents = [Agent.objects.create(name=f"agent-{i}", token_hash=f"{i:064d}") for i in range(10)]
    finals = [Status.SUCCEEDED, Status.DENIED, Status.FAILED, Status.EXPIRED]

    def rows(count, status_for):
        for i in range(count):
            tool = tools[i % len(tools)]
            status = status_for(i)
            yield ToolCall(
                agent=agents[i % len(agents)], server=tool.server, tool=tool,
                server_name=tool.server.name, tool_name=tool.name,
                tool_fingerprint=tool.fingerprint,
                arguments={"q": f"question {i}", "email": f"user{i}@example.com"},
                status=status,
                decided_by="" if status == Status.PENDING_APPROVAL else DecidedBy.HUMAN,
                decided_by_user=None if status == Status.PENDING_APPROVAL else user,
                note="" if status == Status.PENDING_APPROVAL else f"note {i}",
                result_content=[{"type": "text", "text": f"answer {i}"}] if status == Status.SUCCEEDED else None,  # noqa: E501
                requested_at=now - timedelta(seconds=count - i),
                expires_at=now + timedelta(days=1),
            )  # fmt: skip

    started = time.perf_counter()
    batch = []
    for call in rows(history, lambda i: finals[i % len(finals)]):
        batch.append(call)
        if len(batch) == 20_000:
            ToolCall.objects.bulk_create(batch)
            batch = []
            print(f"  history rows: {ToolCall.objects.count():,}", end="\r", flush=True)
    ToolCall.objects.bulk_create(
        batch + list(rows(pending, lambda i: Status.PENDING_APPROVAL)), batch_size=20_000
    )
    took = time.perf_counter() - started
    print(f"  created {history:,} history and {pending:,} pending rows in {took:.0f} s")
    return user


def measure(client, url, repeat):
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        response = client.get(url)
        times.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, (url, response.status_code)
    return statistics.median(times), max(times), len(response.content)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pending", type=int, default=10_000)
    parser.add_argument("--history", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="toolgate-bench-") as var_dir:
        setup_django(var_dir)
        from django.db import connection
        from django.test import Client

        print(f"Database: {connection.vendor}; populating…")
        user = populate(args.pending, args.history)
        from approvals.models import ToolCall

        middle = ToolCall.objects.order_by("pk").values_list("pk", flat=True)[args.history // 2]
        client = Client(HTTP_HOST="localhost")
        client.force_login(user)
        pages = {
            f"queue, {args.pending:,} pending (100 oldest shown)": "/approvals/",
            "queue filtered by server": "/approvals/?server=server-3",
            "queue state (polled)": "/approvals/state",
            "history, first page": "/approvals/history/",
            "history, page in the middle": f"/approvals/history/?before={middle}",
            "history filtered by status": "/approvals/history/?status=failed",
            "history filtered by server + tool": "/approvals/history/?server=server-2&tool=tool_1",
            "history filtered by agent, deep": f"/approvals/history/?agent=agent-7&before={middle}",
        }
        print(f"\n{'page':<55} {'median ms':>10} {'worst ms':>10} {'KB':>8}")
        for label, url in pages.items():
            median, worst, size = measure(client, url, args.repeat)
            print(f"{label:<55} {median:>10.1f} {worst:>10.1f} {size / 1024:>8.0f}")


if __name__ == "__main__":
    main()
