"""Seeded audit trails for the dashboard, anomaly and metrics tests: tool calls written straight
to the database with the timestamps a real history would have."""

from datetime import timedelta

from django.utils import timezone

from approvals.models import DecidedBy, Status, ToolCall
from integrations.models import Agent, McpServer, Tool

# How each final status is usually reached: who decided, and whether it ran.
DECIDERS = {
    Status.SUCCEEDED: DecidedBy.HUMAN,
    Status.DENIED: DecidedBy.HUMAN,
    Status.BLOCKED: DecidedBy.POLICY,
    Status.EXPIRED: "",
    Status.CANCELLED: "",
    Status.PENDING_APPROVAL: "",
    Status.FAILED: DecidedBy.HUMAN,
    Status.UNKNOWN: DecidedBy.HUMAN,
}


def this_hour(minutes=0):
    """The start of the current hour (plus `minutes`), in the current time zone."""
    now = timezone.localtime()
    return now.replace(minute=0, second=0, microsecond=0) + timedelta(minutes=minutes)


def server_with_tools(name="crm", tools=("lookup", "refund")):
    server = McpServer.objects.create(name=name, url=f"https://{name}.example/mcp")
    now = timezone.now()
    for tool in tools:
        definition = {"name": tool, "description": f"The {tool} tool.", "inputSchema": {}}
        Tool.objects.create_from_definition(server, definition, now)
    return server


def agent(name="support-bot", *servers):
    return Agent.create_with_token(name, servers)[0]


def call(*args, **kwargs):
    """One call requested at `at`, already in `status`, saved."""
    built = build(*args, **kwargs)
    built.save()
    return built


def build(
    agent, server, tool, at, status=Status.SUCCEEDED, decided_by=None, decision_seconds=None,
    run_seconds=None, arguments=None, error_code="", is_error=None, user=None,
):  # fmt: skip
    """One call requested at `at`, already in `status`, not saved yet."""
    decided_by = DECIDERS[status] if decided_by is None else decided_by
    decided_at = None
    if decided_by == DecidedBy.AUTO or decided_by == DecidedBy.POLICY:
        decided_at = at
    elif decided_by == DecidedBy.HUMAN:
        decided_at = at + timedelta(seconds=30 if decision_seconds is None else decision_seconds)
    started_at = finished_at = None
    if status in (Status.SUCCEEDED, Status.FAILED, Status.UNKNOWN):
        started_at = (decided_at or at) + timedelta(milliseconds=50)
        finished_at = started_at + timedelta(seconds=0.2 if run_seconds is None else run_seconds)
    elif status != Status.PENDING_APPROVAL:
        finished_at = decided_at or at + timedelta(seconds=600)
    tool_row = server.tools.filter(name=tool).first() if server else None
    return ToolCall(
        agent=agent, server=server, tool=tool_row,
        server_name=server.name if server else "nowhere", tool_name=tool,
        tool_fingerprint=tool_row.fingerprint if tool_row else "",
        arguments=arguments or {}, status=status, decided_by=decided_by,
        decided_by_user=user if decided_by == DecidedBy.HUMAN else None,
        decided_at=decided_at, requested_at=at, started_at=started_at, finished_at=finished_at,
        expires_at=at + timedelta(seconds=600), error_code=error_code, is_error=is_error,
    )  # fmt: skip


def calls(count, *args, **kwargs):
    return [call(*args, **kwargs) for _ in range(count)]


def habits(agent, server, tool, before, days=7, hours=range(9, 18), per_hour=2, **kwargs):
    """An agent's usual work: `per_hour` calls in each of `hours` on each of the `days` before
    `before` (a datetime), auto-approved unless said otherwise."""
    kwargs.setdefault("decided_by", DecidedBy.AUTO)
    midnight = before.replace(hour=0, minute=0, second=0, microsecond=0)
    rows = [
        build(
            agent,
            server,
            tool,
            midnight - timedelta(days=day, hours=-hour, minutes=-10 - n),
            **kwargs,
        )
        for day in range(1, days + 1)
        for hour in hours
        for n in range(per_hour)
    ]
    ToolCall.objects.bulk_create(rows)
