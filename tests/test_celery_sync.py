"""A real Celery worker process syncs servers (embedded broker; Redis and PostgreSQL in the
second pass of `make test`)."""

import pytest

from integrations.models import McpServer
from integrations.tasks import sync_all_servers
from tests.conftest import wait_until
from tests.test_server_admin import form_data

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_a_server_saved_in_the_admin_is_synced_by_the_worker(celery_worker, admin_client, mcp_demo):
    data = form_data(
        url=mcp_demo.url, secret_token="", headers_text="", transport=mcp_demo.transport,
        allow_http="on", allow_private_network="on",
    )  # fmt: skip
    assert admin_client.post("/admin/integrations/mcpserver/add/", data).status_code == 302
    server = McpServer.objects.get()

    wait_until(lambda: McpServer.objects.get().last_synced_at)

    server.refresh_from_db()
    assert server.sync_state == "idle"
    assert server.last_error == ""
    assert server.tools.count() == 5
    page = admin_client.get(f"/admin/integrations/mcpserver/{server.pk}/change/").content.decode()
    assert "delete_file" in page


def test_the_worker_records_a_failing_sync(celery_worker):
    server = McpServer.objects.create(
        name="dead", url="http://127.0.0.1:9/mcp", allow_private_network=True
    )
    server.request_sync()
    wait_until(lambda: McpServer.objects.get().last_error)
    assert "Could not connect" in McpServer.objects.get().last_error


def test_the_periodic_sync_covers_every_enabled_server(celery_worker, mcp_demo_http):
    for name in ("one", "two"):
        McpServer.objects.create(name=name, url=mcp_demo_http.url, allow_private_network=True)
    McpServer.objects.create(
        name="off", url=mcp_demo_http.url, allow_private_network=True, enabled=False
    )
    sync_all_servers.delay()
    wait_until(lambda: McpServer.objects.filter(last_synced_at__isnull=False).count() == 2)
    assert not McpServer.objects.get(name="off").tools.exists()
