"""The link to the approval queue, with the pending count, on the admin's index and in the
header of every admin page and of the approvers' pages; only approvers see it."""

import pytest
from django.contrib.auth.models import User
from django.test import Client

from approvals.models import Status, ToolCall
from integrations.models import Agent, McpServer

pytestmark = pytest.mark.django_db


@pytest.fixture
def pending():
    server = McpServer.objects.create(name="shop", url="https://mcp.example.com/mcp")
    agent, _ = Agent.create_with_token("bot", [server])

    def make(status):
        return ToolCall.objects.create(
            agent=agent, server=server, server_name="shop", tool_name="refund",
            status=status, expires_at="2999-01-01T00:00:00Z",
        )  # fmt: skip

    make(Status.PENDING_APPROVAL)
    make(Status.PENDING_APPROVAL)
    make(Status.DENIED)


def test_the_admin_index_links_to_the_queue_with_the_pending_count(admin_client, pending):
    html = admin_client.get("/admin/").content.decode()
    assert (
        '<a class="tg-queue-link" href="/approvals/">Approval queue: '
        '<span class="tg-count">2</span> pending requests</a>'
    ) in html


def test_every_admin_page_has_the_link_in_its_header(admin_client, pending):
    for page in ("/admin/integrations/mcpserver/", "/admin/approvals/toolcall/"):
        html = admin_client.get(page).content.decode()
        assert (
            '<a class="tg-queue-link" href="/approvals/">Approval queue '
            '<span class="tg-count">2</span></a>'
        ) in html


def test_the_approvers_pages_show_the_count_in_their_header(admin_client, pending):
    history = admin_client.get("/approvals/history/").content.decode()
    assert 'Queue <span class="count" aria-label="pending">2</span>' in history
    queue = admin_client.get("/approvals/").content.decode()  # its own count is kept live
    assert 'aria-label="pending"' not in queue
    assert '<span class="count" id="pending-count">2</span>' in queue


def test_staff_who_cannot_approve_get_no_link(pending):
    client = Client()
    client.force_login(User.objects.create_user("sam", password="pw-sam-12345", is_staff=True))
    html = client.get("/admin/").content.decode()
    assert "tg-queue-link" not in html


def test_nothing_is_counted_for_a_visitor_who_is_not_logged_in(pending, django_assert_num_queries):
    with django_assert_num_queries(0):
        assert Client().get("/accounts/login/").status_code == 200
