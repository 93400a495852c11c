"""The operator commands: mcp_server add/sync/list and mcp_tool approval."""

import io

import pytest
from django.core.management import CommandError, call_command

from integrations.models import McpServer, Tool
from tests.mcp_servers import PROTECTED_HEADER, PROTECTED_TOKEN, protected_server


def run(*args):
    out, err = io.StringIO(), io.StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue() + err.getvalue()


@pytest.mark.django_db
def test_add_creates_the_server_and_prints_its_tools(mcp_demo):
    output = run(
        "mcp_server", "add", "--name", "demo", "--url", mcp_demo.url,
        "--transport", mcp_demo.transport, "--allow-private-network", "--allow-http",
        "--approval-mode", "fine_grained",
    )  # fmt: skip
    server = McpServer.objects.get(name="demo")
    assert server.approval_mode == "fine_grained"
    assert server.tools.count() == 5
    assert "delete_file" in output and "destructive" in output


@pytest.mark.django_db
def test_add_reads_the_token_from_an_environment_variable(mcp_factory, monkeypatch):
    running = mcp_factory(protected_server())
    monkeypatch.setenv("DEMO_TOKEN", PROTECTED_TOKEN)
    name, value = PROTECTED_HEADER
    run(
        "mcp_server", "add", "--name", "p", "--url", running.url, "--token-env", "DEMO_TOKEN",
        "--header", f"{name}: {value}", "--allow-private-network", "--allow-http",
    )  # fmt: skip
    server = McpServer.objects.get(name="p")
    assert server.secret_token == PROTECTED_TOKEN
    assert server.tools.count() == 5


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--url", "ftp://x.example/"], "https"),
        (["--url", "https://x.example/", "--header", "Host: y"], "set by Toolgate"),
        (["--url", "https://x.example/", "--token-env", "NO_SUCH_VAR_SET"], "is empty"),
        # The refusals name the flag that allows what was refused.
        (["--url", "http://x.example/mcp"], "add --allow-http"),
        (["--url", "https://127.0.0.1:8001/mcp"], "loopback.*add --allow-private-network"),
    ],
)
def test_add_refuses_bad_input_and_changes_nothing(extra, message):
    with pytest.raises(CommandError, match=message):
        run("mcp_server", "add", "--name", "bad", *extra)
    assert not McpServer.objects.exists()


@pytest.mark.django_db
def test_sync_exits_non_zero_with_the_error(mcp_factory):
    McpServer.objects.create(name="dead", url="http://127.0.0.1:9/mcp", allow_private_network=True)
    with pytest.raises(CommandError, match="Sync failed for dead"):
        run("mcp_server", "sync", "dead")
    assert "Could not connect" in McpServer.objects.get().last_error


@pytest.mark.django_db
def test_sync_by_name(mcp_demo_http):
    McpServer.objects.create(name="demo", url=mcp_demo_http.url, allow_private_network=True)
    output = run("mcp_server", "sync", "demo")
    assert "5 added" in output


@pytest.mark.django_db
def test_sync_of_an_unknown_server_is_an_error():
    with pytest.raises(CommandError, match="No MCP server named nope"):
        run("mcp_server", "sync", "nope")


@pytest.mark.django_db
def test_list_shows_scheme_and_host_only():
    McpServer.objects.create(name="z", url="https://mcp.example.com/secret/KEY123?t=abc")
    output = run("mcp_server", "list")
    assert "https://mcp.example.com" in output
    assert "KEY123" not in output and "abc" not in output
    assert "never" in output


@pytest.mark.django_db
def test_tool_approval_sets_the_setting(mcp_demo_http):
    McpServer.objects.create(name="demo", url=mcp_demo_http.url, allow_private_network=True)
    run("mcp_server", "sync", "demo")
    run("mcp_tool", "approval", "demo", "delete_file", "disabled")
    assert Tool.objects.get(name="delete_file").approval == "disabled"


@pytest.mark.django_db
def test_tool_approval_of_an_unknown_tool_is_an_error():
    with pytest.raises(CommandError, match="No tool 'x'"):
        run("mcp_tool", "approval", "demo", "x", "disabled")


@pytest.mark.django_db
def test_add_makes_personal_data_need_a_human_by_default_like_the_admin(mcp_demo_http):
    from approvals.models import Status, request_tool_call
    from integrations.models import Agent

    run(
        "mcp_server", "add", "--name", "demo", "--url", mcp_demo_http.url,
        "--allow-private-network", "--allow-http", "--approval-mode", "no_approval",
    )  # fmt: skip
    server = McpServer.objects.get(name="demo")
    assert server.personal_data_needs_approval
    agent, _ = Agent.create_with_token("bot", [server])
    card_number, _ = request_tool_call(agent, "demo", "echo", {"text": "4111 1111 1111 1111"})
    assert card_number.status == Status.PENDING_APPROVAL
    assert card_number.reasons[0]["code"] == "personal_data"


@pytest.mark.django_db
def test_add_can_turn_the_personal_data_check_off(mcp_demo_http):
    run(
        "mcp_server", "add", "--name", "demo", "--url", mcp_demo_http.url,
        "--allow-private-network", "--allow-http", "--no-personal-data-approval",
    )  # fmt: skip
    assert not McpServer.objects.get(name="demo").personal_data_needs_approval


@pytest.mark.django_db
def test_review_prints_the_diff_it_accepts_and_marks_the_tool_reviewed(mcp_factory):
    from tests.mcp_servers import mutable_server

    remote = mutable_server()
    server = McpServer.objects.create(
        name="m", url=mcp_factory(remote).url, allow_private_network=True
    )
    server.sync_tools()
    remote.change_tool("lookup", description="Look something up, differently.")
    server.sync_tools()
    output = run("mcp_tool", "review", "m", "lookup")
    assert '-  "description": "Look something up.",' in output
    assert '+  "description": "Look something up, differently.",' in output
    assert "marked reviewed" in output
    assert not Tool.objects.get(name="lookup").needs_review
    assert "already reviewed" in run("mcp_tool", "review", "m", "lookup")


@pytest.mark.django_db
def test_approval_warns_when_the_tool_still_needs_review(mcp_demo_http):
    McpServer.objects.create(name="demo", url=mcp_demo_http.url, allow_private_network=True)
    run("mcp_server", "sync", "demo")
    assert "Warning" not in run("mcp_tool", "approval", "demo", "echo", "auto_approved")
    Tool.objects.filter(name="echo").update(fingerprint="changed")
    output = run("mcp_tool", "approval", "demo", "echo", "auto_approved")
    assert "still needs review" in output and "mcp_tool review demo echo" in output


@pytest.mark.django_db
def test_agent_commands_refuse_unknown_agents_and_missing_servers():
    with pytest.raises(CommandError, match="No agent named 'ghost'"):
        run("agent", "deactivate", "ghost")
    McpServer.objects.create(name="s", url="https://s.example/mcp")
    run("agent", "create", "bot")
    with pytest.raises(CommandError, match="at least one --server"):
        run("agent", "grant", "bot")
