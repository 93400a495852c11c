"""OAuth servers from a shell: `mcp_server add --auth oauth …`, the `authorize` command that
prints one `Open:` line and waits for the browser, and client credentials (no browser)."""

import io
import os
import subprocess
import sys

import httpx2
import pytest
from django.core.management import CommandError, call_command

from integrations.models import McpServer
from integrations.oauth import OAuthAuthorization, OAuthCredential
from tests.conftest import ROOT, _database_url, track
from tests.oauth_servers import READ, basic_credentials, sign_in, start_oauth_world


def run(*args):
    out, err = io.StringIO(), io.StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def add(mcp, *extra):
    return run(
        "mcp_server", "add", "--name", "files", "--url", mcp.url, "--transport",
        "streamable_http", "--allow-private-network", "--allow-http", *extra,
    )  # fmt: skip


@pytest.mark.django_db
def test_add_with_oauth_waits_for_a_sign_in(mcp_factory):
    auth, mcp = start_oauth_world(mcp_factory)
    out, _ = add(mcp, "--auth", "oauth", "--scope", "files:read", "--scope", "files:write")
    assert "Connect it: manage.py mcp_server authorize files" in out
    server = McpServer.objects.get()
    credential = OAuthCredential.objects.get(server=server)
    assert server.auth_kind == "oauth" and credential.scope == "files:read files:write"
    assert auth.token_requests == [] and server.last_synced_at is None
    listing, _ = run("mcp_server", "list")
    assert " connect " in listing


@pytest.mark.django_db
def test_add_with_client_credentials_connects_and_syncs_at_once(mcp_factory, monkeypatch):
    auth, mcp = start_oauth_world(mcp_factory)
    auth.preregister("machine", "m2m-secret-value", grant_types=["client_credentials"])
    monkeypatch.setenv("FILES_SECRET", "m2m-secret-value")
    out, _ = add(
        mcp, "--auth", "oauth", "--grant", "client_credentials", "--client-id", "machine",
        "--client-secret-env", "FILES_SECRET", "--scope", READ,
    )  # fmt: skip
    assert "files: synced, 5 added" in out
    (request,) = auth.grants("client_credentials")
    assert basic_credentials(request.authorization) == ("machine", "m2m-secret-value")
    assert request.form["scope"] == READ and request.form["resource"] == mcp.url
    credential = OAuthCredential.objects.get()
    assert credential.is_connected and credential.connected_at and credential.client_id == "machine"
    assert "m2m-secret-value" not in out


@pytest.mark.django_db
def test_client_credentials_are_renewed_with_a_new_request(mcp_factory, monkeypatch, settings):
    settings.OAUTH_REFRESH_MARGIN = 120
    auth, mcp = start_oauth_world(mcp_factory, access_lifetime=60)
    auth.preregister("machine", "m2m-secret-value", grant_types=["client_credentials"])
    monkeypatch.setenv("FILES_SECRET", "m2m-secret-value")
    add(mcp, "--auth", "oauth", "--grant", "client_credentials", "--client-id", "machine",
        "--client-secret-env", "FILES_SECRET")  # fmt: skip
    assert McpServer.objects.get().sync_tools().ok
    assert len(auth.grants("client_credentials")) == 2
    assert OAuthCredential.objects.get().last_refreshed_at is not None


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--auth", "oauth", "--grant", "client_credentials"], "need a client ID and secret"),
        (["--auth", "oauth", "--client-secret-env", "SOME_SECRET"], "needs its client ID"),
        (["--auth", "oauth", "--scope", 'a"b'], "Scopes are words"),
        (["--auth", "oauth", "--issuer", "ftp://x"], "oauth_issuer"),
        (["--auth", "oauth", "--token-env", "SOME_SECRET"], "gets its token by signing in"),
    ],
)
def test_add_refuses_bad_oauth_options(mcp_factory, monkeypatch, extra, message):
    monkeypatch.setenv("SOME_SECRET", "value-1234")
    _auth, mcp = start_oauth_world(mcp_factory)
    with pytest.raises(CommandError, match=message):
        add(mcp, *extra)
    assert not McpServer.objects.exists()


@pytest.mark.django_db
def test_authorize_refuses_a_server_without_oauth(mcp_demo_http):
    McpServer.objects.create(name="plain", url=mcp_demo_http.url)
    with pytest.raises(CommandError, match="No MCP server named plain uses OAuth"):
        run("mcp_server", "authorize", "plain")


def authorize(name, site_url, timeout):
    env = {**os.environ, "DATABASE_URL": _database_url(), "SITE_URL": site_url}
    command = [sys.executable, "manage.py", "mcp_server", "authorize", name]
    process = subprocess.Popen(
        [*command, "--timeout", str(timeout)], cwd=ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    return track(process)


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_authorize_prints_one_line_and_waits_for_the_browser(mcp_factory, live_server, settings):
    settings.SITE_URL = live_server.url
    auth, mcp = start_oauth_world(mcp_factory)
    add(mcp, "--auth", "oauth")
    process = authorize("files", live_server.url, timeout=120)

    line = process.stdout.readline()
    assert line.startswith(f"Open: {auth.issuer}/authorize?")
    assert process.poll() is None  # waiting
    callback = sign_in(line.removeprefix("Open: ").strip())
    assert callback.startswith(f"{live_server.url}/oauth/callback/?")
    page = httpx2.get(callback)  # any browser: the state is bound to the waiting command
    assert page.status_code == 200 and "files is connected" in page.text

    assert process.wait(timeout=60) == 0
    assert process.stdout.read() == ""  # exactly one line on stdout
    assert "Connected files" in process.stderr.read()
    credential = OAuthCredential.objects.get()
    assert credential.is_connected and credential.connected_by is None
    assert httpx2.get(callback).status_code == 400  # used


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_authorize_gives_up_after_its_timeout(mcp_factory, live_server, settings):
    settings.SITE_URL = live_server.url
    auth, mcp = start_oauth_world(mcp_factory)
    add(mcp, "--auth", "oauth")
    process = authorize("files", live_server.url, timeout=2)
    line = process.stdout.readline()
    assert line.startswith("Open: ")
    assert process.wait(timeout=60) != 0
    assert "Timed out: the browser did not come back to Toolgate within 2 seconds" in (
        process.stderr.read()
    )
    # The browser coming back late connects nothing.
    late = httpx2.get(sign_in(line.removeprefix("Open: ").strip()))
    assert late.status_code == 400
    assert OAuthAuthorization.objects.get().status == "expired"
    assert not OAuthCredential.objects.get().access_token and auth.token_requests == []


@pytest.mark.django_db
def test_authorize_connects_a_client_credentials_server(mcp_factory, monkeypatch):
    auth, mcp = start_oauth_world(mcp_factory)
    auth.preregister("machine", "m2m-secret-value", grant_types=["client_credentials"])
    server = McpServer.objects.create(
        name="m2m", url=mcp.url, auth_kind="oauth", allow_private_network=True, allow_http=True
    )
    OAuthCredential.objects.create(
        server=server, grant="client_credentials", client_source="pre_registered",
        client_id="machine", client_secret="m2m-secret-value",
    )  # fmt: skip
    out, err = run("mcp_server", "authorize", "m2m")
    assert out == "" and "Connected m2m (client credentials)" in err
    assert OAuthCredential.objects.get().is_connected
