from django.contrib import admin
from django.templatetags.static import static
from django.urls import include, path
from django.views.generic import RedirectView

from approvals.metrics import metrics
from approvals.urls import auth_urlpatterns

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
