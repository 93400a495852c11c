"""The figures of the approvers' dashboard (`/approvals/dashboard/`).

Every figure is an aggregate computed by the database over one time window (the last 24 hours
or 7 days, from the start of an hour), so the page costs the same whatever the size of the
history; `bench/dashboard.py` measures it with 1,000,000 calls. Percentiles are exact
(`percentile_cont`), computed with window functions that SQLite and PostgreSQL both have.
"""

from dataclasses import dataclass
from datetime import UTC, timedelta

from django.db.models import (
    Case,
    Count,
    DateTimeField,
    F,
    FloatField,
    Func,
    IntegerField,
    Min,
    Q,
    Value,
    When,
    Window,
)
from django.db.models.functions import RowNumber
from django.utils import timezone

from approvals.models import Anomaly, DecidedBy, Status, ToolCall
from integrations.models import McpServer, Tool

PERIODS = {"24h": 24, "7d": 24 * 7}  # hours shown
TABLE_ROWS = 25  # busiest tools and agents listed

# What became of a call, in the chart's order (bottom of a bar first). Failed and unknown win
# over how the call was decided: an approved call that failed is counted as failed.
OUTCOMES = [
    ("auto", "Ran on its own"),
    ("approved", "Approved"),
    ("denied", "Denied"),
    ("blocked", "Blocked"),
    ("expired", "Expired"),
    ("failed", "Failed"),
    ("unknown", "Unknown"),
    ("cancelled", "Cancelled"),
    ("pending", "Waiting"),
]


def outcome():
    """The outcome of a call (a key of OUTCOMES) as an SQL expression."""
    by_status = {
        Status.FAILED: "failed",
        Status.UNKNOWN: "unknown",
        Status.DENIED: "denied",
        Status.BLOCKED: "blocked",
        Status.EXPIRED: "expired",
        Status.CANCELLED: "cancelled",
        Status.PENDING_APPROVAL: "pending",
    }
    whens = [When(status=status, then=Value(key)) for status, key in by_status.items()]
    whens.append(When(decided_by=DecidedBy.AUTO, then=Value("auto")))
    return Case(*whens, default=Value("approved"))  # a human approved; it ran or runs


class Seconds(Func):
    """Seconds from `start` to `end` (datetimes), computed by the database itself: Django's
    own datetime arithmetic runs a Python function per row on SQLite, 50x slower here."""

    arity = 2
    output_field = FloatField()

    def __init__(self, end, start):
        super().__init__(_datetime(end), _datetime(start))

    def as_sqlite(self, compiler, connection, **extra):
        template = "((julianday(%(expressions)s)) * 86400.0)"
        return self.as_sql(compiler, connection, template=template, arg_joiner=") - julianday(")

    def as_postgresql(self, compiler, connection, **extra):
        template = "EXTRACT(EPOCH FROM (%(expressions)s))"
        return self.as_sql(compiler, connection, template=template, arg_joiner=" - ")


class Slot(Func):
    """Which slot of `size` seconds, counted from 0, a number of seconds (>= 0) falls in."""

    output_field = IntegerField()

    def __init__(self, seconds, size):
        super().__init__(seconds, Value(float(size)))

    def as_sqlite(self, compiler, connection, **extra):
        template = "CAST(%(expressions)s AS INTEGER)"
        return self.as_sql(compiler, connection, template=template, arg_joiner=" / ")

    def as_postgresql(self, compiler, connection, **extra):
        template = "CAST(FLOOR(%(expressions)s) AS INTEGER)"
        return self.as_sql(compiler, connection, template=template, arg_joiner=" / ")


def _datetime(value):
    """A column name, or a datetime given as a query parameter."""
    if isinstance(value, str):
        return F(value)
    return Value(value, output_field=DateTimeField())


def slot_of(column, start, size):
    """The slot of `size` seconds after `start` that a datetime column falls in."""
    return Slot(Seconds(column, start), size)


def hour_start(moment):
    """The start of the hour `moment` falls in, in the current time zone, as a UTC datetime
    (arithmetic on it stays right across daylight-saving changes)."""
    local = timezone.localtime(moment).replace(minute=0, second=0, microsecond=0)
    return local.astimezone(UTC)


def as_duration(seconds):
    """Seconds as a timedelta, to the millisecond (the database's float arithmetic is exact
    to a few microseconds); None stays None."""
    return None if seconds is None else timedelta(seconds=round(seconds, 3))


def decision_time():
    """Seconds from request to human decision, for calls a human decided."""
    return Seconds("decided_at", "requested_at")


def human_decisions(calls):
    return calls.filter(decided_by=DecidedBy.HUMAN, decided_at__isnull=False)


def percentiles(calls, value, fractions, group_by=()):
    """`percentile_cont` of `value` over `calls` for each of `fractions`, per group, in one
    query: {group tuple: ([value per fraction], how many rows)}.

    Each group's rows are numbered in order of `value`; only the one or two rows around each
    wanted position are read back and interpolated, as PostgreSQL's percentile_cont does.
    """
    partition = [F(name) for name in group_by] or None
    wanted = [
        When(_rn__gt=Value(f) * (F("_n") - 1), _rn__lt=Value(f) * (F("_n") - 1) + 2, then=1)
        for f in fractions
    ]
    rows = (
        calls.order_by()
        .annotate(
            _v=value,
            _rn=Window(RowNumber(), partition_by=partition, order_by=value.asc()),
            _n=Window(Count("pk"), partition_by=partition),
        )
        .annotate(_wanted=Case(*wanted, default=0))
        .filter(_wanted=1)
        .values_list(*group_by, "_v", "_rn", "_n")
    )
    around = {}
    for *group, v, rn, n in rows:
        around.setdefault(tuple(group), (n, {}))[1][rn] = v
    result = {}
    for group, (n, values) in around.items():
        result[group] = ([_interpolate(values, f * (n - 1) + 1) for f in fractions], n)
    return result


def _interpolate(values, position):
    """The value at a fractional 1-based `position`, from the rows numbered around it."""
    low, high = values[int(position)], values.get(int(position) + 1)
    return low if high is None else low + (high - low) * (position - int(position))


@dataclass
class Filters:
    period: str = "24h"
    server: str = ""
    agent: str = ""

    def window(self, now):
        """(start, end, hour starts): whole hours, the current one last."""
        this_hour = hour_start(now)
        hours = [this_hour - timedelta(hours=n) for n in reversed(range(PERIODS[self.period]))]
        return hours[0], this_hour + timedelta(hours=1), hours

    def calls(self, start, end):
        # Bounded on both sides: SQLite's planner only then trusts the requested_at index over
        # scanning a grouping column's index (the whole table) to skip a sort.
        calls = ToolCall.objects.filter(requested_at__gte=start, requested_at__lt=end)
        if self.server:
            calls = calls.filter(server_name=self.server)
        if self.agent:
            calls = calls.filter(agent__name=self.agent)
        return calls


def figures(filters, now=None):
    """Everything the dashboard shows, for `filters` (a Filters)."""
    now = now or timezone.now()
    start, end, hours = filters.window(now)
    calls = filters.calls(start, end)
    hourly = calls_per_hour(calls, hours)
    totals = {key: sum(counts[key] for _, counts, _ in hourly) for key, _ in OUTCOMES}
    return {
        "start": start,
        "end": end,
        "hourly": hourly,
        "totals": totals,
        "total": sum(totals.values()),
        "decisions": decision_figures(calls, totals),
        "tools": breakdown(calls, ("server_name", "tool_name")),
        # "+ 0": grouping by the bare column lets SQLite's planner skip-scan an index led by
        # agent over the window, which is slower than the requested_at range it should use.
        "agents": named_agents(
            breakdown(calls.annotate(agent_key=F("agent_id") + 0), ("agent_key",))
        ),
        "pending": pending_figures(filters, now),
        "servers": server_figures(filters),
        "anomalies": recent_anomalies(filters, start),
    }


def calls_per_hour(calls, hours):
    """[(hour start, {outcome: count}, total)] for every hour, empty ones included."""
    counts = {hour: {key: 0 for key, _ in OUTCOMES} for hour in hours}
    rows = (
        calls.order_by()
        .annotate(slot=slot_of("requested_at", hours[0], 3600), outcome=outcome())
        .values_list("slot", "outcome")
        .annotate(n=Count("pk"))
    )
    for slot, key, n in rows:
        hour = hours[min(slot, len(hours) - 1)]  # a clock ahead of ours counts as this hour
        counts[hour][key] += n
    return [(hour, by_outcome, sum(by_outcome.values())) for hour, by_outcome in counts.items()]


def decision_figures(calls, totals):
    (median, p95), count = percentiles(human_decisions(calls), decision_time(), (0.5, 0.95)).get(
        (), ((None, None), 0)
    )
    return {
        "count": count,
        "median": as_duration(median),
        "p95": as_duration(p95),
        "expired": totals["expired"],
    }


def breakdown(calls, group_by):
    """Per tool or per agent, busiest first: calls, how they were decided, median decision."""
    rows = list(
        calls.order_by()
        .values_list(*group_by)
        .annotate(
            calls=Count("pk"),
            auto=Count("pk", filter=Q(decided_by=DecidedBy.AUTO)),
            approved=Count("pk", filter=Q(decided_by=DecidedBy.HUMAN) & ~Q(status=Status.DENIED)),
            denied=Count("pk", filter=Q(status=Status.DENIED)),
            blocked=Count("pk", filter=Q(status=Status.BLOCKED)),
        )
        .order_by("-calls", *group_by)
    )
    medians = percentiles(human_decisions(calls), decision_time(), (0.5,), group_by)
    table = []
    for row in rows[:TABLE_ROWS]:
        *group, total, auto, approved, denied, blocked = row
        table.append(
            {
                "name": " / ".join(map(str, group)),
                "group": group,
                "calls": total,
                "shares": {
                    key: count / total
                    for key, count in (
                        ("auto", auto),
                        ("approved", approved),
                        ("denied", denied),
                        ("blocked", blocked),
                    )
                },
                "median": as_duration(medians.get(tuple(group), ((None,), 0))[0][0]),
            }
        )
    return {"rows": table, "more": max(len(rows) - TABLE_ROWS, 0)}


def named_agents(table):
    """The per-agent table grouped by id (no join over the window's rows), with names."""
    from integrations.models import Agent

    ids = [row["group"][0] for row in table["rows"]]
    names = dict(Agent.objects.filter(pk__in=ids).values_list("pk", "name"))
    for row in table["rows"]:
        row["name"] = names.get(row["group"][0], "(deleted agent)")
    return table


def pending_figures(filters, now):
    pending = ToolCall.objects.filter(status=Status.PENDING_APPROVAL)
    if filters.server:
        pending = pending.filter(server_name=filters.server)
    if filters.agent:
        pending = pending.filter(agent__name=filters.agent)
    figures = pending.aggregate(count=Count("pk"), oldest=Min("requested_at"))
    figures["waited"] = now - figures["oldest"] if figures["oldest"] else None
    return figures


def server_figures(filters):
    """Each server's sync state and how many of its tools wait for a review."""
    servers = McpServer.objects.order_by("name")
    if filters.server:
        servers = servers.filter(name=filters.server)
    servers = list(servers)
    awaiting = dict.fromkeys((server.pk for server in servers), 0)
    # The review rule lives on Tool (needs_review); asking it keeps this count in step with it.
    tools = Tool.objects.listed().filter(server__in=servers)
    for tool in tools.only(
        "server", "fingerprint", "reviewed_fingerprint", "warnings", "reviewed_by"
    ):
        awaiting[tool.server_id] += tool.needs_review
    return [{"server": server, "awaiting_review": awaiting[server.pk]} for server in servers]


def recent_anomalies(filters, start, limit=50):
    anomalies = Anomaly.objects.filter(first_seen_at__gte=start).select_related(
        "agent", "acknowledged_by"
    )
    if filters.server:
        anomalies = anomalies.filter(server_name=filters.server)
    if filters.agent:
        anomalies = anomalies.filter(agent__name=filters.agent)
    return list(anomalies.order_by("-first_seen_at", "-id")[:limit])
