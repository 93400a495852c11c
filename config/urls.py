from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

from approvals.metrics import metrics
from approvals.urls import auth_urlpatterns

admin.site.site_header = "Toolgate"
admin.site.site_title = "Toolgate"
admin.site.index_title = "MCP servers, tools and agents"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("oauth/", include("integrations.urls")),
    path("metrics", metrics, name="metrics"),
    path("", include("approvals.urls")),
    path("", include(auth_urlpatterns)),
    path("", RedirectView.as_view(url="/approvals/", permanent=False)),
]
