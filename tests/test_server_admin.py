"""The MCP server and tool admin: secrets write-only, sync on save, tool settings."""

import ipaddress
import re
import threading

import anyio
import pytest
from django.test import TestCase
from django.utils.html import escape

from integrations import netguard
from integrations.models import McpServer, Tool, ToolApproval

URL = "https://mcp.example.com/path/KEY-IN-PATH?k=QUERY-SECRET"
TOKEN = "TOKEN-SECRET-1"
HEADER_VALUE = "HEADER-SECRET-2"
SECRETS = ("KEY-IN-PATH", "QUERY-SECRET", TOKEN, HEADER_VALUE)


def form_data(**overrides):
    data = {
        "name": "zapier",
        "description": "Zapier tools",
        "url": URL,
        "transport": "auto",
        "secret_token": TOKEN,
        "headers_text": f"X-Api-Key: {HEADER_VALUE}",
        "approval_mode": "always_ask",
        "enabled": "on",
        "tools-TOTAL_FORMS": "0",
        "tools-INITIAL_FORMS": "0",
        "tools-MIN_NUM_FORMS": "0",
        "tools-MAX_NUM_FORMS": "1000",
    }
    data.update(overrides)
    return {key: value for key, value in data.items() if value is not None}


def make_server(**kwargs):
    defaults = {
        "name": "zapier",
        "url": URL,
        "secret_token": TOKEN,
        "headers": {"X-Api-Key": HEADER_VALUE},
    }
    return McpServer.objects.create(**{**defaults, **kwargs})


def make_tool(server, name, **kwargs):
    now = server.created_at
    defaults = {
        "fingerprint": "a",
        "reviewed_fingerprint": "a",
        "first_seen_at": now,
        "last_seen_at": now,
    }
    return Tool.objects.create(server=server, name=name, **{**defaults, **kwargs})


@pytest.mark.django_db
def test_adding_a_server_stores_it_and_queues_a_sync(
    admin_client, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks() as callbacks:
        response = admin_client.post("/admin/integrations/mcpserver/add/", form_data())
    assert response.status_code == 302
    server = McpServer.objects.get(name="zapier")
    assert (server.url, server.secret_token) == (URL, TOKEN)
    assert server.headers == {"X-Api-Key": HEADER_VALUE}
    assert server.approval_mode == "always_ask"
    assert server.sync_state == "queued"
    assert len(callbacks) == 1  # the sync is enqueued only once the save has committed


@pytest.mark.django_db
def test_always_ask_is_the_default_and_labelled_recommended(admin_client):
    response = admin_client.get("/admin/integrations/mcpserver/add/")
    html = response.content.decode()
    assert "Always Ask (Recommended)" in html
    assert 'value="always_ask" checked' in html.replace("\n", " ") or "checked" in html


@pytest.mark.django_db
def test_no_secret_appears_in_any_admin_page(admin_client):
    server = make_server(last_error="")
    make_tool(server, "echo")
    pages = [
        "/admin/integrations/mcpserver/",
        f"/admin/integrations/mcpserver/{server.pk}/change/",
        "/admin/integrations/tool/",
        f"/admin/integrations/tool/{server.tools.get().pk}/change/",
        f"/admin/integrations/mcpserver/{server.pk}/sync-status/",
        "/admin/integrations/mcpserver/add/",
    ]
    for page in pages:
        html = admin_client.get(page).content.decode()
        for secret in SECRETS:
            assert secret not in html, (page, secret)
    listing = admin_client.get("/admin/integrations/mcpserver/").content.decode()
    assert "https://mcp.example.com" in listing


def without_typed_url(html):
    """The page minus the one place the URL typed into this POST may be shown back: the value
    of the URL field itself."""
    return re.sub(r'(<input type="password" name="url" value=")[^"]*"', r'\1"', html)


@pytest.mark.django_db
def test_a_refused_form_keeps_the_typed_url_and_nothing_else_secret(admin_client):
    response = admin_client.post(
        "/admin/integrations/mcpserver/add/", form_data(transport="carrier-pigeon")
    )
    assert response.status_code == 200
    html = response.content.decode()
    url_input = response.context["adminform"].form["url"]
    assert url_input.value() == URL and f'value="{escape(URL)}"' in html  # no retyping
    for secret in SECRETS:
        assert secret not in without_typed_url(html)
    # The token and headers are not shown back, and the page says so.
    assert html.count("Not kept after an error: enter it again.") == 2
    assert "no-store" in response["Cache-Control"]
    assert not McpServer.objects.exists()


@pytest.mark.django_db
def test_a_refused_change_never_shows_the_stored_url(admin_client):
    server = make_server()
    data = form_data(url="", secret_token="", headers_text="", transport="carrier-pigeon")
    response = admin_client.post(f"/admin/integrations/mcpserver/{server.pk}/change/", data)
    assert response.status_code == 200
    html = response.content.decode()
    for secret in SECRETS:
        assert secret not in html
    assert "Not kept after an error" not in html  # nothing was typed into them


@pytest.mark.django_db
def test_blank_secrets_keep_the_stored_ones(admin_client):
    server = make_server()
    data = form_data(url="", secret_token="", headers_text="", description="new text")
    response = admin_client.post(f"/admin/integrations/mcpserver/{server.pk}/change/", data)
    assert response.status_code == 302
    server.refresh_from_db()
    assert (server.url, server.secret_token, server.description) == (URL, TOKEN, "new text")
    assert server.headers == {"X-Api-Key": HEADER_VALUE}


@pytest.mark.django_db
def test_checkboxes_clear_the_token_and_headers(admin_client):
    server = make_server()
    data = form_data(
        url="", secret_token="", headers_text="", clear_secret_token="on", clear_headers="on"
    )
    admin_client.post(f"/admin/integrations/mcpserver/{server.pk}/change/", data)
    server.refresh_from_db()
    assert (server.secret_token, server.headers) == ("", {})


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"url": "ftp://mcp.example.com/"}, "https"),
        ({"url": "http://mcp.example.com/mcp"}, "plain HTTP"),
        ({"headers_text": "no colon here"}, "expected"),
        ({"headers_text": "Host: evil.example"}, "set by Toolgate"),
        ({"headers_text": "Bad Name: x"}, "not a valid header name"),
        ({"headers_text": "Authorization: Basic abc"}, "Authorization is set by the secret token"),
        # The endpoint's own routes would shadow these at /mcp/<name>/, or split them.
        ({"name": "sse"}, "can&#x27;t be a server name"),
        ({"name": "messages"}, "can&#x27;t be a server name"),
        ({"name": "crm/tools"}, "can&#x27;t be a server name"),
        ({"name": "crm\ttools"}, "can&#x27;t be a server name"),
    ],
)
def test_bad_input_gets_a_clear_error_and_changes_nothing(admin_client, overrides, message):
    response = admin_client.post("/admin/integrations/mcpserver/add/", form_data(**overrides))
    assert response.status_code == 200
    assert message in response.content.decode()
    assert not McpServer.objects.exists()


@pytest.mark.django_db
def test_plain_http_is_accepted_when_allowed(admin_client):
    data = form_data(url="http://mcp.example.com/mcp", allow_http="on")
    assert admin_client.post("/admin/integrations/mcpserver/add/", data).status_code == 302


@pytest.mark.django_db
def test_the_server_list_shows_status_tool_count_and_error(admin_client):
    server = make_server(last_error="Could not connect to https://mcp.example.com over SSE.")
    make_tool(server, "a")
    make_tool(server, "b")
    make_tool(server, "gone", removed_at=server.created_at)
    html = admin_client.get("/admin/integrations/mcpserver/").content.decode()
    assert "Could not connect" in html
    assert '<td class="field-tool_count">2</td>' in html
    assert "Error" in html


class ServerListQueriesTest(TestCase):
    def test_the_server_list_does_not_query_per_server(self):
        from django.contrib.auth.models import User

        self.client.force_login(User.objects.create_superuser("q", password="pw"))
        for i in range(3):
            make_server(name=f"s{i}")
        # Session, user, two counts, the page of servers, the header's pending-approvals count.
        with self.assertNumQueries(6):
            self.client.get("/admin/integrations/mcpserver/")
        for i in range(3, 20):
            make_server(name=f"s{i}")
        with self.assertNumQueries(6):
            self.client.get("/admin/integrations/mcpserver/")


@pytest.mark.django_db
def test_the_sync_action_queues_the_selected_servers(
    admin_client, django_capture_on_commit_callbacks
):
    one, two = make_server(name="one"), make_server(name="two")
    with django_capture_on_commit_callbacks() as callbacks:
        admin_client.post(
            "/admin/integrations/mcpserver/",
            {"action": "sync_now", "_selected_action": [one.pk, two.pk]},
        )
    assert len(callbacks) == 2
    assert set(McpServer.objects.values_list("sync_state", flat=True)) == {"queued"}


@pytest.mark.django_db
def test_the_change_page_lists_tools_with_hints_and_an_editable_setting(admin_client):
    server = make_server()
    make_tool(server, "delete_file", annotations={"destructiveHint": True})
    html = admin_client.get(f"/admin/integrations/mcpserver/{server.pk}/change/").content.decode()
    assert "delete_file" in html
    assert "destructive" in html
    assert 'name="tools-0-approval"' in html


@pytest.mark.django_db
def test_the_sync_status_endpoint_reports_progress(admin_client):
    server = make_server(sync_state="syncing")
    data = admin_client.get(f"/admin/integrations/mcpserver/{server.pk}/sync-status/").json()
    assert data["state"] == "syncing"
    assert data["status"] == "Syncing…"


@pytest.mark.django_db
def test_bulk_actions_set_the_approval_setting(admin_client):
    server = make_server()
    tools = [make_tool(server, name) for name in ("a", "b", "c")]
    admin_client.post(
        "/admin/integrations/tool/",
        {"action": "set_disabled", "_selected_action": [tools[0].pk, tools[1].pk]},
    )
    settings = dict(Tool.objects.values_list("name", "approval"))
    assert settings == {"a": "disabled", "b": "disabled", "c": "requires_approval"}


@pytest.mark.django_db
def test_the_tool_list_filters_by_hint_and_review(admin_client):
    server = make_server()
    make_tool(server, "reader", annotations={"readOnlyHint": True})
    make_tool(server, "changed", fingerprint="new")
    make_tool(server, "flagged", warnings=[{"code": "hidden_instructions"}])
    make_tool(server, "plain")

    def names(query):
        response = admin_client.get(f"/admin/integrations/tool/?{query}")
        return {tool.name for tool in response.context["cl"].queryset}

    assert names("hint=readOnlyHint") == {"reader"}
    assert names("review=needed") == {"changed", "flagged"}
    assert names("review=ok") == {"reader", "plain"}
    assert names(f"server__id__exact={server.pk}&approval__exact=requires_approval") == {
        "reader",
        "changed",
        "flagged",
        "plain",
    }


@pytest.mark.django_db
def test_tools_can_be_set_in_bulk_from_the_list(admin_client):
    server = make_server()
    a, b = make_tool(server, "a"), make_tool(server, "b")
    data = {
        "form-TOTAL_FORMS": "2", "form-INITIAL_FORMS": "2",
        "form-0-id": a.pk, "form-0-approval": "auto_approved",
        "form-1-id": b.pk, "form-1-approval": "disabled",
        "_save": "Save",
    }  # fmt: skip
    admin_client.post("/admin/integrations/tool/", data)
    assert dict(Tool.objects.values_list("name", "approval")) == {
        "a": ToolApproval.AUTO_APPROVED,
        "b": ToolApproval.DISABLED,
    }


@pytest.mark.django_db
def test_mark_reviewed_records_who(admin_client, admin_user):
    server = make_server()
    tool = make_tool(server, "changed", fingerprint="new")
    admin_client.post(
        "/admin/integrations/tool/", {"action": "mark_reviewed", "_selected_action": [tool.pk]}
    )
    tool.refresh_from_db()
    assert not tool.needs_review
    assert tool.reviewed_by == admin_user


@pytest.mark.django_db(transaction=True)
def test_saving_a_server_while_the_broker_is_down_says_so(admin_client, monkeypatch):
    from kombu.exceptions import OperationalError

    from integrations.tasks import sync_server

    def broker_down(*args, **kwargs):
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(sync_server, "delay", broker_down)
    response = admin_client.post("/admin/integrations/mcpserver/add/", form_data())
    assert response.status_code == 302
    server = McpServer.objects.get()
    assert server.sync_state == "idle"
    assert "could not be queued" in server.last_error
    assert server.sync_failing  # not read as a sync that only refused some tools


@pytest.fixture
def fake_dns(monkeypatch):
    """Answers for host names, as a resolver elsewhere would give them (none: unresolvable)."""
    answers = {}
    real = netguard.resolve_host

    async def resolve(host, port):
        if host == "localhost":  # on this machine: its own resolver
            return await real(host, port)
        if host not in answers:
            raise OSError("Name or service not known")
        return [ipaddress.ip_address(address) for address in answers[host]]

    monkeypatch.setattr(netguard, "resolve_host", resolve)
    return answers


@pytest.mark.django_db
def test_plain_http_is_refused_naming_the_option_to_tick(admin_client):
    response = admin_client.post(
        "/admin/integrations/mcpserver/add/", form_data(url="http://mcp.example.com/mcp")
    )
    assert response.status_code == 200
    [error] = response.context["adminform"].form.errors["url"]
    assert "plain http://" in error and "tick “Allow plain HTTP”" in error
    assert not McpServer.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("url", "answers", "said"),
    [
        ("https://127.0.0.1:8001/mcp", {}, "127.0.0.1 is an address that is not public (loopback)"),
        ("https://[::1]/mcp", {}, "::1 is an address that is not public (loopback)"),
        ("https://localhost:8001/mcp", {}, "localhost resolves to"),  # the machine's own resolver
        (
            "https://mcp.corp.example/mcp",
            {"mcp.corp.example": ["10.1.2.3"]},
            "mcp.corp.example resolves to 10.1.2.3, an address that is not public "
            "(private network (RFC 1918))",
        ),
        (
            "https://meta.example/",
            {"meta.example": ["93.184.216.34", "169.254.169.254"]},
            "meta.example resolves to 169.254.169.254",
        ),
    ],
)
def test_a_private_address_is_found_when_saving_and_names_the_option(
    admin_client, fake_dns, url, answers, said
):
    fake_dns.update(answers)
    response = admin_client.post("/admin/integrations/mcpserver/add/", form_data(url=url))
    assert response.status_code == 200
    [error] = response.context["adminform"].form.errors["url"]
    assert said in error
    assert "If this server runs on your own machine or network, tick “Allow private network”" in (
        error
    )
    assert not McpServer.objects.exists()
    allowed = form_data(url=url, allow_private_network="on")
    assert admin_client.post("/admin/integrations/mcpserver/add/", allowed).status_code == 302


@pytest.mark.django_db
def test_a_local_plain_http_server_gets_both_options_named_at_once(admin_client):
    data = form_data(url="http://127.0.0.1:8001/mcp")
    response = admin_client.post("/admin/integrations/mcpserver/add/", data)
    errors = response.context["adminform"].form.errors["url"]
    assert len(errors) == 2
    assert "tick “Allow plain HTTP”" in errors[0]
    assert "tick “Allow private network”" in errors[1]
    both = form_data(url="http://127.0.0.1:8001/mcp", allow_http="on", allow_private_network="on")
    assert admin_client.post("/admin/integrations/mcpserver/add/", both).status_code == 302


@pytest.mark.django_db
def test_a_range_blocked_for_every_server_is_refused_even_on_a_private_network(
    admin_client, fake_dns, settings
):
    settings.MCP_EXTRA_BLOCKED_NETWORKS = ["10.9.0.0/16"]
    fake_dns["mcp.corp.example"] = ["10.9.0.5"]
    data = form_data(url="https://mcp.corp.example/mcp", allow_private_network="on")
    response = admin_client.post("/admin/integrations/mcpserver/add/", data)
    [error] = response.context["adminform"].form.errors["url"]
    assert "in blocked range 10.9.0.0/16" in error and "MCP_EXTRA_BLOCKED_NETWORKS" in error
    assert "tick" not in error  # no option allows it
    assert not McpServer.objects.exists()


@pytest.mark.django_db
def test_a_public_or_unresolvable_host_is_saved_and_left_to_the_sync(admin_client, fake_dns):
    fake_dns["mcp.example.org"] = ["93.184.216.34"]
    public = form_data(name="public", url="https://mcp.example.org/mcp")
    assert admin_client.post("/admin/integrations/mcpserver/add/", public).status_code == 302
    unknown = form_data(name="unknown", url="https://nowhere.invalid/mcp")
    assert admin_client.post("/admin/integrations/mcpserver/add/", unknown).status_code == 302
    assert McpServer.objects.count() == 2


@pytest.mark.django_db
def test_a_resolver_that_hangs_does_not_hold_the_save(admin_client, monkeypatch):
    released = threading.Event()

    async def hang(host, port):
        while not released.is_set():
            await anyio.sleep(0.05)
        raise OSError("gave up")

    monkeypatch.setattr(netguard, "resolve_host", hang)
    monkeypatch.setattr(netguard, "SAVE_TIME_RESOLVE_TIMEOUT", 0.2)
    try:
        response = admin_client.post("/admin/integrations/mcpserver/add/", form_data())
    finally:
        released.set()
    assert response.status_code == 302  # no verdict in time: the sync will find out
    assert McpServer.objects.count() == 1


@pytest.mark.django_db
def test_the_add_page_offers_nothing_to_remove_and_no_tools_table(admin_client):
    html = admin_client.get("/admin/integrations/mcpserver/add/").content.decode()
    for absent in ("Remove the stored", "Leave blank to keep", "leave blank to keep",
                   'id="server-tools"', "tools-TOTAL_FORMS", "Tool sync"):  # fmt: skip
        assert absent not in html, absent


@pytest.mark.django_db
def test_the_change_page_offers_to_remove_only_what_is_stored(admin_client):
    bare = make_server(name="bare", secret_token="", headers={})
    html = admin_client.get(f"/admin/integrations/mcpserver/{bare.pk}/change/").content.decode()
    assert "Remove the stored" not in html and "A token is stored" not in html
    assert "leave blank to keep it" in html  # the URL is always stored
    assert "No tools yet: save the server to list them." in html  # not an empty table
    full = make_server(name="full")
    html = admin_client.get(f"/admin/integrations/mcpserver/{full.pk}/change/").content.decode()
    assert "Remove the stored token" in html and "Remove the stored headers" in html
    assert "A token is stored; leave blank to keep it." in html
    assert "Stored: X-Api-Key; leave blank to keep them." in html


@pytest.mark.django_db
def test_an_oauth_client_secret_can_be_removed_only_when_one_is_stored(admin_client):
    from integrations.oauth import ClientSource, OAuthCredential

    server = make_server(name="oauth", secret_token="", auth_kind="oauth")
    page = f"/admin/integrations/mcpserver/{server.pk}/change/"
    OAuthCredential.objects.create(server=server)  # Toolgate identifies itself: no secret
    html = admin_client.get(page).content.decode()
    assert "Remove the stored client secret" not in html and "A client secret is stored" not in html
    OAuthCredential.objects.filter(server=server).update(
        client_source=ClientSource.PRE_REGISTERED, client_id="toolgate", client_secret="cs-1"
    )
    html = admin_client.get(page).content.decode()
    assert "Remove the stored client secret" in html
    assert "A client secret is stored; leave blank to keep it." in html
    assert "cs-1" not in html
