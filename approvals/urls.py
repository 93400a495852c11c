from django.urls import path

from approvals import api

urlpatterns = [
    path("api/v1/tools", api.tools),
    path("api/v1/tool-calls", api.tool_calls),
    path("api/v1/tool-calls/<int:call_id>", api.tool_call),
    path("api/v1/tool-calls/<int:call_id>/cancel", api.cancel),
]
