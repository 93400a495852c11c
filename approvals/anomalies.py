"""Unusual approval patterns, found in the audit trail by a periodic scan (`scan()`).

Each scan looks at the current and the previous hour (so every hour is judged by the scans
during it and by those of the hour after) and compares each agent and tool with its own
habits over the `ANOMALY_BASELINE_DAYS` before. What it finds is stored as an `Anomaly` whose
key names the kind, the subject and the window: seeing the same pattern again only refreshes
its numbers, so each anomaly is stored and announced once, however often the scan runs and
however many scans run at once.

Windows are whole clock hours (refusal bursts: blocks of `ANOMALY_BURST_MINUTES`), in
`TIME_ZONE`: the same history always gives the same anomalies, whenever the scan runs. A
pattern that straddles two windows is judged as two halves.

Agents are judged against their habits only once they have some: calls on at least
`ANOMALY_MIN_HISTORY_DAYS` of the baseline days. Until then their rate, hours and new tools are
their onboarding, not an anomaly (refusal bursts and large arguments are judged from day one).
"""

import hashlib
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Avg, Count, Exists, F, Min, OuterRef, Q
from django.utils import timezone

from approvals.dashboard import hour_start, slot_of
from approvals.models import Anomaly, AnomalyKind, DecidedBy, Status, ToolCall
from approvals.notifications import notify
from approvals.pii import find_personal_data

logger = logging.getLogger(__name__)

MAX_NEW_PER_SCAN = 100  # a flood of findings is cut here, so notifications can't flood either
CALLS_SHOWN = 100  # calls listed behind one anomaly


@dataclass
class Finding:
    kind: str
    window_start: datetime
    window_end: datetime
    numbers: dict
    agent_id: int | None = None
    server_name: str = ""
    tool_name: str = ""
    once_ever: bool = field(default=False)  # the key leaves the window out (new tools)

    @property
    def key(self):
        parts = [self.kind, self.agent_id, self.server_name, self.tool_name]
        if not self.once_ever:
            parts.append(self.window_start.isoformat())
        return hashlib.sha256(repr(parts).encode()).hexdigest()


# --- The readings: where each kind of event is found in the audit trail ----------------------


def arguments_size():
    """The size of a call's arguments as requested (bytes of their canonical JSON), as an SQL
    expression: the arguments themselves are encrypted, so their size is stored beside them."""
    return F("arguments_size")


def has_personal_data(arguments):
    """Whether a call's arguments carried personal data, as the queue card's warnings say.

    Not the call's `personal_data` reason: the policy records that only where the server asks
    a human for personal data, and the warnings are shown for every server."""
    return bool(find_personal_data(arguments))


def refusals():
    """Calls a human denied or the policy blocked (invalid arguments included)."""
    return Q(status=Status.DENIED, decided_by=DecidedBy.HUMAN) | Q(status=Status.BLOCKED)


# --- The scan ---------------------------------------------------------------------------------


def scan(now=None):
    """Store the anomalies in the last two hours that aren't stored yet; {kind: how many}."""
    now = now or timezone.now()
    hours = _hours_judged(now)
    history = AgentHistory(hours, now)
    findings = [
        *call_rate(history),
        *off_hours(history),
        *new_tools(history),
        *refusal_bursts(hours[0], now),
        *personal_data(hours, now),
        *large_arguments(hours[0], now),
    ]
    created = Counter()
    for finding in findings:
        if sum(created.values()) >= MAX_NEW_PER_SCAN:
            logger.warning("Anomaly scan stopped at %s new anomalies", MAX_NEW_PER_SCAN)
            break
        if record(finding):
            created[finding.kind] += 1
    return dict(created)


def _hours_judged(now):
    this_hour = hour_start(now)
    return [this_hour - timedelta(hours=1), this_hour]


def record(finding):
    """Store a finding as a new Anomaly and announce it; None when it was already known."""
    known = Anomaly.objects.filter(key=finding.key)
    if known.exists():
        known.update(numbers=finding.numbers, last_seen_at=timezone.now())
        return None
    try:
        with transaction.atomic():
            anomaly = Anomaly.objects.create(
                key=finding.key,
                kind=finding.kind,
                agent_id=finding.agent_id,
                server_name=finding.server_name,
                tool_name=finding.tool_name,
                window_start=finding.window_start,
                window_end=finding.window_end,
                numbers=finding.numbers,
            )
    except IntegrityError:
        return None  # a scan running at the same time stored it first
    announce(anomaly)
    return anomaly


def announce(anomaly):
    """Tell people about a new anomaly, once: the log, and the `anomaly` notification."""
    logger.warning("Anomaly #%s: %s", anomaly.pk, anomaly.summary)
    notify("anomaly", anomaly)


class AgentHistory:
    """Calls per agent and hour, from the baseline's first day to now: one grouped query that
    serves the rate, the usual hours and whether an agent has habits yet."""

    def __init__(self, hours, now):
        self.hours, self.now = hours, now
        self.days = settings.ANOMALY_BASELINE_DAYS
        since = hours[0] - timedelta(days=self.days)
        rows = (
            ToolCall.objects.filter(requested_at__gte=since, requested_at__lte=now)
            .order_by()
            .annotate(slot=slot_of("requested_at", since, 3600))
            .values_list("agent_id", "slot")
            .annotate(n=Count("pk"))
        )
        self.counts = defaultdict(dict)  # agent id -> {hour start: calls}
        for agent_id, slot, n in rows:
            self.counts[agent_id][since + timedelta(hours=slot)] = n

    def calls(self, agent_id, hour):
        return self.counts[agent_id].get(hour, 0)

    def baseline(self, agent_id, hour):
        """The hours of the baseline days before `hour`, with their calls."""
        start = hour - timedelta(days=self.days)
        return {h: n for h, n in self.counts[agent_id].items() if start <= h < hour}

    def seasoned(self, agent_id, hour):
        days = {timezone.localtime(h).date() for h in self.baseline(agent_id, hour)}
        return len(days) >= settings.ANOMALY_MIN_HISTORY_DAYS

    def judged(self):
        """(agent id, hour, calls in it) for every agent with habits and calls in an hour."""
        for agent_id in self.counts:
            for hour in self.hours:
                n = self.calls(agent_id, hour)
                if n and self.seasoned(agent_id, hour):
                    yield agent_id, hour, n


def call_rate(history):
    """An agent's calls in an hour far above its mean for that hour of the day."""
    for agent_id, hour, n in history.judged():
        same_hour = [history.calls(agent_id, hour - timedelta(days=d)) for d in _days()]
        usual = sum(same_hour) / len(same_hour)
        threshold = max(settings.ANOMALY_RATE_MIN_CALLS, settings.ANOMALY_RATE_FACTOR * usual)
        if n >= threshold:
            numbers = {"calls": n, "usual": round(usual, 1), "threshold": round(threshold, 1)}
            yield Finding(AnomalyKind.CALL_RATE, hour, hour + timedelta(hours=1), numbers, agent_id)


def off_hours(history):
    """Calls in an hour of the day in which the agent hasn't worked on the baseline days."""
    for agent_id, hour, n in history.judged():
        days_per_hour = defaultdict(set)
        for h in history.baseline(agent_id, hour):
            local = timezone.localtime(h)
            days_per_hour[local.hour].add(local.date())
        usual = sorted(
            h for h, days in days_per_hour.items() if len(days) >= settings.ANOMALY_USUAL_HOUR_DAYS
        )
        hour_of_day = timezone.localtime(hour).hour
        if usual and hour_of_day not in usual:
            numbers = {"calls": n, "hour": hour_of_day, "usual_hours": usual}
            yield Finding(AnomalyKind.OFF_HOURS, hour, hour + timedelta(hours=1), numbers, agent_id)


def new_tools(history):
    """An agent with habits calling a tool it has never called before."""
    since = history.hours[0]
    earlier = ToolCall.objects.filter(
        agent=OuterRef("agent_id"),
        server_name=OuterRef("server_name"),
        tool_name=OuterRef("tool_name"),
        requested_at__lt=since,
    )
    # Tools that existed when called (a fingerprint was recorded): names an agent makes up are
    # refused, and counted as refusals, not as new tools.
    rows = (
        ToolCall.objects.filter(requested_at__gte=since, requested_at__lte=history.now)
        .exclude(tool_fingerprint="")
        .order_by()
        .values_list("agent_id", "server_name", "tool_name")
        .annotate(first=Min("requested_at"), n=Count("pk"), before=Exists(earlier))
    )
    for agent_id, server_name, tool_name, first, n, before in rows:
        hour = hour_start(first)
        if before or not history.seasoned(agent_id, hour):
            continue
        numbers = {"calls": n, "first": first.isoformat()}
        yield Finding(
            AnomalyKind.NEW_TOOL, hour, hour + timedelta(hours=1), numbers,
            agent_id, server_name, tool_name, once_ever=True,
        )  # fmt: skip


def refusal_bursts(since, now):
    """Many calls of one agent denied or blocked within a few minutes."""
    minutes = settings.ANOMALY_BURST_MINUTES
    rows = (
        ToolCall.objects.filter(refusals(), requested_at__gte=since, requested_at__lte=now)
        .order_by()
        .annotate(slot=slot_of("requested_at", since, minutes * 60))
        .values_list("agent_id", "slot", "status", "error_code")
        .annotate(n=Count("pk"))
    )
    windows = defaultdict(Counter)
    for agent_id, slot, status, error_code, n in rows:
        counts = windows[agent_id, since + timedelta(minutes=slot * minutes)]
        counts[status] += n
        counts["invalid_arguments"] += n if error_code == "invalid_arguments" else 0
    for (agent_id, start), counts in windows.items():
        total = counts[Status.DENIED] + counts[Status.BLOCKED]
        if total >= settings.ANOMALY_REFUSAL_BURST:
            numbers = {
                "refused": total,
                "denied": counts[Status.DENIED],
                "blocked": counts[Status.BLOCKED],
                "invalid_arguments": counts["invalid_arguments"],
                "minutes": minutes,
            }
            end = start + timedelta(minutes=minutes)
            yield Finding(AnomalyKind.REFUSALS, start, end, numbers, agent_id)


def personal_data(hours, now):
    """Far more calls with personal data in an hour than usual, for one agent or one tool."""
    days = _days()
    for hour in hours:
        seen = _personal_data_counts(hour, min(hour + timedelta(hours=1), now))
        usual = Counter()
        for d in days:
            start = hour - timedelta(days=d)
            usual.update(_personal_data_counts(start, start + timedelta(hours=1)))
        for subject, n in seen.items():
            mean = usual[subject] / len(days)
            threshold = max(
                settings.ANOMALY_PERSONAL_DATA_MIN_CALLS, settings.ANOMALY_RATE_FACTOR * mean
            )
            if n >= threshold:
                agent_id, server_name, tool_name = subject
                numbers = {"calls": n, "usual": round(mean, 1), "threshold": round(threshold, 1)}
                yield Finding(
                    AnomalyKind.PERSONAL_DATA, hour, hour + timedelta(hours=1), numbers,
                    agent_id, server_name, tool_name,
                )  # fmt: skip


def _personal_data_counts(start, end):
    """Calls with personal data from `start` to `end`, per agent and per tool."""
    counts = Counter()
    rows = ToolCall.objects.filter(requested_at__gte=start, requested_at__lt=end).values_list(
        "agent_id", "server_name", "tool_name", "arguments"
    )
    for agent_id, server_name, tool_name, arguments in rows.iterator(chunk_size=2000):
        if has_personal_data(arguments):
            counts[agent_id, "", ""] += 1
            counts[None, server_name, tool_name] += 1
    return counts


def large_arguments(since, now):
    """Calls whose arguments are far larger than the tool's usual ones."""
    floor = settings.ANOMALY_ARGUMENTS_MIN_BYTES
    large = list(
        ToolCall.objects.annotate(size=arguments_size())
        .filter(requested_at__gte=since, requested_at__lte=now, size__gte=floor)
        .values_list("agent_id", "server_name", "tool_name", "requested_at", "size")
    )
    usual = _usual_sizes(since, {(server, tool) for _, server, tool, _, _ in large})
    groups = defaultdict(list)
    for agent_id, server_name, tool_name, requested_at, size in large:
        mean = usual.get((server_name, tool_name))
        if mean is not None and size >= max(floor, settings.ANOMALY_ARGUMENTS_FACTOR * mean):
            hour = hour_start(requested_at)
            groups[agent_id, server_name, tool_name, hour].append(size)
    for (agent_id, server_name, tool_name, hour), sizes in groups.items():
        mean = usual[server_name, tool_name]
        numbers = {
            "calls": len(sizes),
            "largest": max(sizes),
            "usual": round(mean),
            "threshold": round(max(floor, settings.ANOMALY_ARGUMENTS_FACTOR * mean)),
        }
        yield Finding(
            AnomalyKind.LARGE_ARGUMENTS, hour, hour + timedelta(hours=1), numbers,
            agent_id, server_name, tool_name,
        )  # fmt: skip


def _usual_sizes(before, tools):
    """The mean arguments size of each tool on the baseline days, if it has enough calls."""
    if not tools:
        return {}
    start = before - timedelta(days=settings.ANOMALY_BASELINE_DAYS)
    wanted = Q()
    for server_name, tool_name in tools:
        wanted |= Q(server_name=server_name, tool_name=tool_name)
    rows = (
        ToolCall.objects.filter(wanted, requested_at__gte=start, requested_at__lt=before)
        .order_by()
        .values_list("server_name", "tool_name")
        .annotate(mean=Avg(arguments_size()), n=Count("pk"))
    )
    minimum = settings.ANOMALY_ARGUMENTS_MIN_BASELINE
    return {(server, tool): mean for server, tool, mean, n in rows if n >= minimum}


def _days():
    return range(1, settings.ANOMALY_BASELINE_DAYS + 1)


# --- What an anomaly says, and the calls behind it ---------------------------------------------


def summary(anomaly):
    numbers, who = anomaly.numbers, anomaly.subject
    start = timezone.localtime(anomaly.window_start)
    kind = anomaly.kind
    if kind == AnomalyKind.CALL_RATE:
        return (
            f"{who} made {numbers['calls']} calls in the hour from {start:%H:00}; "
            f"usually {numbers['usual']} at that hour."
        )
    if kind == AnomalyKind.OFF_HOURS:
        hours = ", ".join(f"{h:02d}:00" for h in numbers["usual_hours"])
        return (
            f"{who} made {numbers['calls']} calls in the hour from {start:%H:00}, outside the "
            f"hours it usually works (hours starting {hours})."
        )
    if kind == AnomalyKind.NEW_TOOL:
        return f"{who}: called for the first time ({numbers['calls']} calls since {start:%H:00})."
    if kind == AnomalyKind.REFUSALS:
        return (
            f"{who} had {numbers['refused']} calls refused in {numbers['minutes']} minutes from "
            f"{start:%H:%M}: {numbers['denied']} denied, {numbers['blocked']} blocked "
            f"({numbers['invalid_arguments']} for invalid arguments)."
        )
    if kind == AnomalyKind.PERSONAL_DATA:
        return (
            f"{who}: {numbers['calls']} calls with personal data in the hour from "
            f"{start:%H:00}; usually {numbers['usual']}."
        )
    return (
        f"{who}: {numbers['calls']} calls with arguments up to {numbers['largest']:,} "
        f"characters in the hour from {start:%H:00}; usually {numbers['usual']:,}."
    )


def calls_behind(anomaly):
    """The calls that make up an anomaly (at most CALLS_SHOWN), newest first."""
    calls = ToolCall.objects.filter(
        requested_at__gte=anomaly.window_start, requested_at__lt=anomaly.window_end
    ).select_related("agent", "decided_by_user")
    if anomaly.agent_id:
        calls = calls.filter(agent_id=anomaly.agent_id)
    if anomaly.tool_name:
        calls = calls.filter(server_name=anomaly.server_name, tool_name=anomaly.tool_name)
    if anomaly.kind == AnomalyKind.REFUSALS:
        calls = calls.filter(refusals())
    if anomaly.kind == AnomalyKind.LARGE_ARGUMENTS:
        calls = calls.annotate(size=arguments_size()).filter(size__gte=anomaly.numbers["threshold"])
    calls = calls.order_by("-requested_at", "-id")
    if anomaly.kind == AnomalyKind.PERSONAL_DATA:
        picked = (call for call in calls.iterator() if has_personal_data(call.arguments))
        return [call for call, _ in zip(picked, range(CALLS_SHOWN), strict=False)]
    return list(calls[:CALLS_SHOWN])
