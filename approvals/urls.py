from django.contrib.auth import views as auth_views
from django.urls import path, re_path

from approvals import api, dashboard_views, views

app_name = "approvals"

urlpatterns = [
    path("api/v1/tools", api.tools),
    path("api/v1/tool-calls", api.tool_calls),
    path("api/v1/tool-calls/<int:call_id>", api.tool_call),
    path("api/v1/tool-calls/<int:call_id>/cancel", api.cancel),
    re_path(r"^api/", api.not_found),  # a JSON error for any other path under /api/
    path("approvals/", views.queue, name="queue"),
    path("approvals/state", views.queue_state, name="queue_state"),
    path("approvals/history/", views.history, name="history"),
    path("approvals/<int:call_id>/", views.call_page, name="call"),
    path("approvals/<int:call_id>/card", views.card, name="card"),
    path("approvals/<int:call_id>/state", views.call_state, name="call_state"),
    path("approvals/<int:call_id>/decide", views.decide, name="decide"),
    path("approvals/dashboard/", dashboard_views.dashboard_page, name="dashboard"),
    path(
        "approvals/dashboard/anomalies/<int:anomaly_id>/",
        dashboard_views.anomaly_page,
        name="anomaly",
    ),
    path(
        "approvals/dashboard/anomalies/<int:anomaly_id>/acknowledge",
        dashboard_views.acknowledge,
        name="acknowledge_anomaly",
    ),
]

# Plain login and logout pages for approvers (not only the admin's).
auth_urlpatterns = [
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
]
