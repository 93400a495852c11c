"""`/metrics`: Toolgate's figures for Prometheus, read from the database at scrape time.

Every figure comes from the audit trail, so it is the same whichever web process is scraped
and however many web and worker processes, on however many machines, wrote it. To keep a
scrape's cost flat as the history grows, `MetricTotals` holds the totals up to a checkpoint
that trails the clock by `SETTLE`; a scrape adds what finished (or was decided) since, and
moves the checkpoint when it is older than `CHECKPOINT_EVERY` (so does a periodic task, which
makes the first, whole-history checkpoint in a worker). See docs/architecture.md.

The endpoint exists only when `METRICS_TOKEN` is set (404 otherwise) and answers 401 without
`Authorization: Bearer <METRICS_TOKEN>`.
"""

import hmac
import json
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import (
    Case,
    Count,
    F,
    Min,
    Q,
    Sum,
    Value,
    When,
)
from django.http import Http404, HttpResponse
from django.utils import timezone
from django.views.decorators.http import require_GET
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import choose_encoder

from approvals.dashboard import Seconds, decision_time, human_decisions
from approvals.models import Anomaly, MetricTotals, Status, ToolCall
from approvals.notifications import Delivery, DeliveryStatus
from integrations.mcp_client import McpError
from integrations.models import McpServer

SETTLE = timedelta(minutes=10)  # later than any commit lag or clock skew between machines
CHECKPOINT_EVERY = timedelta(minutes=5)
DECISION_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1800, 3600)  # seconds to a human decision
CALL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)  # seconds of upstream call
UNKNOWN = "(unknown)"  # a name an agent asked for that matched no tool: not a label value


# --- What is counted ------------------------------------------------------------------------


def server_label():
    return Case(
        When(tool_fingerprint="", server__isnull=True, then=Value(UNKNOWN)),
        default=F("server_name"),
    )


def tool_label():
    # No fingerprint: the tool didn't exist when it was asked for. Label values an agent could
    # make up at will would let it blow up the number of series Prometheus keeps.
    return Case(When(tool_fingerprint="", then=Value(UNKNOWN)), default=F("tool_name"))


def upstream_errors():
    """Calls the MCP server failed (by McpError code), or answered with a tool error."""
    return Q(status=Status.FAILED, error_code__in=McpError.CODES) | Q(
        status=Status.SUCCEEDED, is_error=True
    )


def _since(queryset, column, start, end):
    lookups = {f"{column}__isnull": False}
    if start:
        lookups[f"{column}__gte"] = start
    if end:
        lookups[f"{column}__lt"] = end
    return queryset.filter(**lookups)


def totals_between(start, end):
    """The counters' and histograms' increments from `start` to `end` (None: unbounded)."""
    finished = _since(ToolCall.objects.order_by(), "finished_at", start, end)
    calls = finished.values_list(server_label(), tool_label(), "status", "decided_by").annotate(
        n=Count("pk")
    )
    errors = (
        finished.filter(upstream_errors())
        .annotate(code=Case(When(is_error=True, then=Value("tool_error")), default=F("error_code")))
        .values_list(server_label(), "code")
        .annotate(n=Count("pk"))
    )
    decided = _since(human_decisions(ToolCall.objects.order_by()), "decided_at", start, end)
    ran = finished.filter(started_at__isnull=False).filter(
        Q(status=Status.SUCCEEDED) | Q(status=Status.FAILED, error_code__in=McpError.CODES)
    )
    return {
        "calls": {_key(*row[:-1]): row[-1] for row in calls},
        "errors": {_key(*row[:-1]): row[-1] for row in errors},
        "decision": _histogram(decided, decision_time(), DECISION_BUCKETS),
        "call": _histogram(ran, Seconds("finished_at", "started_at"), CALL_BUCKETS),
    }


def _key(*labels):
    return json.dumps([label or "none" for label in labels])


def _histogram(queryset, seconds, buckets):
    """Cumulative counts per bucket (the last is +Inf) and the sum, in seconds."""
    queryset = queryset.annotate(_s=seconds)
    # Half a millisecond of slack: SQLite's julianday arithmetic is exact to microseconds only,
    # and a decision taken in exactly 5 s belongs in the `le="5.0"` bucket.
    counts = {f"le{i}": Count("pk", filter=Q(_s__lte=b + 0.0005)) for i, b in enumerate(buckets)}
    row = queryset.aggregate(**counts, total=Count("pk"), sum=Sum("_s"))
    cumulative = [row[f"le{i}"] for i in range(len(buckets))] + [row["total"]]
    return {"buckets": cumulative, "sum": row["sum"] or 0.0}


def _merge(a, b):
    merged = {}
    for name in ("calls", "errors"):
        counts = dict(a.get(name, {}))
        for key, n in b[name].items():
            counts[key] = counts.get(key, 0) + n
        merged[name] = counts
    for name in ("decision", "call"):
        old = a.get(name) or {"buckets": [0] * len(b[name]["buckets"]), "sum": 0.0}
        merged[name] = {
            "buckets": [x + y for x, y in zip(old["buckets"], b[name]["buckets"], strict=True)],
            "sum": old["sum"] + b[name]["sum"],
        }
    return merged


def current_totals(now=None):
    """The totals up to now: the checkpoint's plus what came since, moving the checkpoint on
    when it is due (one process wins a conditional UPDATE; the others just read)."""
    now = now or timezone.now()
    checkpoint = MetricTotals.objects.filter(pk=1).first()
    through = checkpoint.through if checkpoint else None
    totals = checkpoint.totals if checkpoint else {}
    target = now - SETTLE
    if through is None or through < target - CHECKPOINT_EVERY:
        totals = _merge(totals, totals_between(through, target))
        _move_checkpoint(through, target, totals)
        through = target
    # Bounded on both sides (see dashboard.Filters.calls); a later finish, from a clock far
    # ahead, is counted once the clock gets there.
    return _merge(totals, totals_between(through, now + SETTLE))


def _move_checkpoint(through, target, totals):
    if through is not None:
        MetricTotals.objects.filter(pk=1, through=through).update(through=target, totals=totals)
        return
    try:
        with transaction.atomic():
            MetricTotals.objects.create(pk=1, through=target, totals=totals)
    except IntegrityError:
        pass  # another scrape made the first checkpoint


# --- The exposition ---------------------------------------------------------------------------


class ToolgateCollector:
    def collect(self):
        now = timezone.now()
        totals = current_totals(now)
        yield _counter(
            "toolgate_tool_calls",
            "Tool calls that reached a final status, by that status and how it was decided.",
            ["server", "tool", "status", "decided_by"],
            totals["calls"],
        )
        yield _histogram_family(
            "toolgate_decision_seconds",
            "Seconds from a request to a human's decision.",
            DECISION_BUCKETS,
            totals["decision"],
        )
        yield _histogram_family(
            "toolgate_tool_call_seconds",
            "Seconds a tool call took on the upstream MCP server.",
            CALL_BUCKETS,
            totals["call"],
        )
        yield from _gauges(now)
        yield _counter(
            "toolgate_upstream_errors",
            "Tool calls an MCP server failed (by error code) or answered with a tool error.",
            ["server", "code"],
            totals["errors"],
        )
        yield _sync_failures()
        yield _notifications()


def _counter(name, documentation, labels, counts):
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, n in sorted(counts.items()):
        family.add_metric(json.loads(key), n)
    return family


def _histogram_family(name, documentation, buckets, totals):
    family = HistogramMetricFamily(name, documentation)
    bounds = [str(float(b)) for b in buckets] + ["+Inf"]
    family.add_metric([], list(zip(bounds, totals["buckets"], strict=True)), totals["sum"])
    return family


def _gauges(now):
    pending = ToolCall.objects.filter(status=Status.PENDING_APPROVAL).aggregate(
        n=Count("pk"), oldest=Min("requested_at")
    )
    yield GaugeMetricFamily(
        "toolgate_pending_calls", "Tool calls waiting for a human now.", value=pending["n"]
    )
    oldest = (now - pending["oldest"]).total_seconds() if pending["oldest"] else 0
    yield GaugeMetricFamily(
        "toolgate_oldest_pending_call_seconds",
        "How long the oldest call waiting for a human has waited (0 when none waits).",
        value=max(oldest, 0),
    )
    open_anomalies = GaugeMetricFamily(
        "toolgate_open_anomalies", "Anomalies nobody has acknowledged yet.", labels=["kind"]
    )
    rows = Anomaly.objects.filter(acknowledged_at__isnull=True).values_list("kind")
    for kind, n in rows.order_by().annotate(n=Count("pk")).order_by("kind"):
        open_anomalies.add_metric([kind], n)
    yield open_anomalies


def _sync_failures():
    family = CounterMetricFamily(
        "toolgate_sync_failures", "Tool-list syncs that failed, per server.", labels=["server"]
    )
    for name, failures in McpServer.objects.order_by("name").values_list(
        "name", "failed_syncs_total"
    ):
        family.add_metric([name], failures)
    return family


def _notifications():
    """Deliveries that reached a final status, by channel kind (the delivery log is far smaller
    than the audit trail: counted whole, over its (channel, status) index)."""
    family = CounterMetricFamily(
        "toolgate_notifications",
        "Notifications to channels that were sent, failed or skipped, by channel kind.",
        labels=["kind", "status"],
    )
    final = [DeliveryStatus.SENT, DeliveryStatus.FAILED, DeliveryStatus.SKIPPED]
    rows = (
        Delivery.objects.filter(status__in=final)
        .order_by()
        .values_list("channel__kind", "status")
        .annotate(n=Count("pk"))
        .order_by("channel__kind", "status")
    )
    for kind, status, n in rows:
        family.add_metric([kind, status], n)
    return family


REGISTRY = CollectorRegistry(auto_describe=False)
REGISTRY.register(ToolgateCollector())


@require_GET
def metrics(request):
    token = settings.METRICS_TOKEN
    if not token:
        raise Http404("Metrics are off: set METRICS_TOKEN to turn them on.")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        response = HttpResponse("Missing or wrong metrics token.\n", status=401)
        response["WWW-Authenticate"] = 'Bearer realm="toolgate-metrics"'
        return response
    # The library's own content negotiation: OpenMetrics for a Prometheus that asks for it.
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return HttpResponse(encode(REGISTRY), content_type=content_type)
