"""The dashboard (`/approvals/dashboard/`), each anomaly's page, and acknowledging one."""

from functools import wraps

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_POST

from approvals import charts, dashboard
from approvals.models import Anomaly
from approvals.views import (
    DECIDE,
    _filter_choices,
    _history_outcome,
    approver_required,
    arguments_diff,
)

READ_AUDIT = "approvals.view_toolcall"


def watcher_required(view):
    """Logged in (else to the login page), and an approver or allowed to read the audit trail."""

    @login_required
    @wraps(view)
    def wrapper(request, *args, **kwargs):
        if not (request.user.has_perm(DECIDE) or request.user.has_perm(READ_AUDIT)):
            raise PermissionDenied("You need to be an approver or allowed to read tool calls.")
        return view(request, *args, **kwargs)

    return wrapper


class FilterForm(forms.Form):
    period = forms.ChoiceField(
        choices=[("24h", "Last 24 hours"), ("7d", "Last 7 days")], required=False
    )
    server = forms.CharField(max_length=100, required=False, strip=True)
    agent = forms.CharField(max_length=100, required=False, strip=True)

    def filters(self):
        data = self.cleaned_data
        return dashboard.Filters(data["period"] or "24h", data["server"], data["agent"])


@require_GET
@watcher_required
def dashboard_page(request):
    form = FilterForm(request.GET)
    context = {"form": form, "choices": _filter_choices(), "outcomes": dashboard.OUTCOMES}
    if not form.is_valid():
        return render(request, "approvals/dashboard.html", context, status=400)
    filters = form.filters()
    figures = dashboard.figures(filters)
    context.update(
        filters=filters,
        figures=figures,
        chart=charts.stacked_bars(figures["hourly"], dashboard.OUTCOMES),
        tables=[
            ("Per tool", figures["tools"], "tools"),
            ("Per agent", figures["agents"], "agents"),
        ],
        hourly_rows=[
            (hour, [counts[key] for key, _ in dashboard.OUTCOMES], total)
            for hour, counts, total in figures["hourly"]
        ],
        can_acknowledge=request.user.has_perm(DECIDE),
    )
    return render(request, "approvals/dashboard.html", context)


@require_GET
@watcher_required
def anomaly_page(request, anomaly_id):
    anomaly = get_object_or_404(
        Anomaly.objects.select_related("agent", "acknowledged_by"), pk=anomaly_id
    )
    calls = [(call, _history_outcome(call), arguments_diff(call)) for call in anomaly.calls()]
    context = {
        "anomaly": anomaly,
        "anomaly_as_list": [anomaly],
        "calls": calls,
        "can_acknowledge": request.user.has_perm(DECIDE),
    }
    return render(request, "approvals/anomaly.html", context)


@require_POST
@approver_required
def acknowledge(request, anomaly_id):
    anomaly = get_object_or_404(Anomaly, pk=anomaly_id)
    if anomaly.acknowledge(request.user):
        messages.success(request, f"Anomaly #{anomaly.pk} acknowledged.")
    else:
        who = anomaly.acknowledged_by.get_username() if anomaly.acknowledged_by else "someone"
        messages.warning(request, f"Anomaly #{anomaly.pk} was already acknowledged by {who}.")
    return redirect(_next(request) or anomaly.get_absolute_url())


def _next(request):
    """Back to the page the form was on, when that is one of ours."""
    target = request.POST.get("next", "")
    ours = url_has_allowed_host_and_scheme(target, allowed_hosts=None)
    return target if ours and target.startswith("/approvals/") else None
