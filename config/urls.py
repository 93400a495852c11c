from django.contrib import admin
from django.templatetags.static import static
from django.urls import include, path
from django.views.generic import RedirectView

from approvals.metrics import metrics
from approvals.urls import auth_urlpatterns

admin.site.site_header = "Toolgate"
admin.site.site_title = "Toolgate"
admin.site.index_title = "MCP servers, tools and agents"
# The lists need the width (at 1280 px the sidebar hid their most important columns); the
# breadcrumbs and the index lead everywhere the sidebar did.
admin.site.enable_nav_sidebar = False

handler500 = "config.views.server_error"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("oauth/", include("integrations.urls")),
    path("metrics", metrics, name="metrics"),
    path("", include("approvals.urls")),
    path("", include(auth_urlpatterns)),
    path("", RedirectView.as_view(url="/approvals/", permanent=False)),
    path("favicon.ico", RedirectView.as_view(url=static("favicon.svg"), permanent=True)),
]
