"""Secrets never leave through logs, error reports, task messages or admin pages (issue 5).

Every secret below is a unique string, so finding it anywhere is a leak: a key in the server
URL's path, one in its query string, the secret token, an extra header's value, an agent's
API token, and the Fernet keys and SECRET_KEY from the settings.
"""

import base64
import io
import json
import logging
import socket
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import quote

import mcp_types
import pytest
from django.conf import settings
from django.core.signals import got_request_exception
from django.db import transaction
from django.test import Client, RequestFactory
from django.utils import timezone
from django.views.debug import ExceptionReporter
from mcp.server import Server
from starlette.responses import JSONResponse, Response

from approvals.models import Status, ToolCall, request_tool_call
from approvals.tasks import run_tool_call
from config.celery import app as celery_app
from integrations import forms, netguard
from integrations.logging import RedactSecretsFilter, redact
from integrations.models import Agent, McpServer, Tool
from integrations.tasks import sync_all_servers, sync_server
from tests.conftest import private_broker as make_private_broker
from tests.conftest import release_private_broker, wait_until
from tests.mcp_servers import _asgi_app_for, _plain_http, protected_server

PATH_SECRET = "pathsecret-Zq81"
QUERY_SECRET = "querysecret-Hw42"
TOKEN = "tokensecret-Mv73"
HEADER_VALUE = "headersecret-Kp95"
ARGUMENT_SECRET = "argsecret-Jn26"  # a value an agent passes to a tool
SERVER_SECRETS = (PATH_SECRET, QUERY_SECRET, TOKEN, HEADER_VALUE)
# Only in error-report tests; kept here, away from the frames whose source lines a report shows.
USER_PASSWORD = "pw-secret-Qa64"
BROKER_PASSWORD = "brokerpass-Xy19"
DATABASE_PASSWORD = "dbpass-Lc55"
ECHO = {
    "name": "echo",
    "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}},
    "annotations": {"readOnlyHint": True},
}


def settings_secrets():
    return (settings.SECRET_KEY, *settings.FIELD_ENCRYPTION_KEYS)


def secret_url(base_url, path="mcp"):
    return f"{base_url}/k/{PATH_SECRET}/{path}?key={QUERY_SECRET}"


def assert_no_secrets(text, secrets, where):
    found = [secret for secret in secrets if secret in text]
    assert not found, f"{found} leaked into {where}:\n{text[:3000]}"


@dataclass
class _UnderSecretPath:
    """Serves `inner` under /k/<PATH_SECRET>/…, so the URL's path really carries a key."""

    inner: object

    def build_asgi_app(self, transport):
        app = _asgi_app_for(self.inner, transport)
        prefix = f"/k/{PATH_SECRET}"

        async def strip(scope, receive, send):
            if scope["type"] == "http" and scope["path"].startswith(prefix):
                path = scope["path"][len(prefix) :]
                scope = {**scope, "path": path, "raw_path": path.encode()}
            await app(scope, receive, send)

        return strip


def secret_server(mcp_factory, token=TOKEN):
    """The demo server behind `TOKEN` and `HEADER_VALUE`, at a URL with keys in it."""
    running = mcp_factory(
        _UnderSecretPath(protected_server(token=token, header=("X-Api-Key", HEADER_VALUE)))
    )
    return running, secret_url(running.base_url)


def make_server(url, name="secret", **kwargs):
    fields = {
        "url": url,
        "secret_token": TOKEN,
        "headers": {"X-Api-Key": HEADER_VALUE},
        "allow_private_network": True,
        "allow_http": True,
        "transport": "streamable_http",
        **kwargs,
    }
    return McpServer.objects.create(name=name, **fields)


def make_agent(*servers):
    return Agent.create_with_token("bot", servers)


def closed_port_url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return secret_url(f"http://127.0.0.1:{port}")


def server_form(url, **overrides):
    data = {
        "name": "secret",
        "url": url,
        "transport": "streamable_http",
        "secret_token": TOKEN,
        "headers_text": f"X-Api-Key: {HEADER_VALUE}",
        "approval_mode": "no_approval",
        "enabled": "on",
        "allow_private_network": "on",
        "allow_http": "on",
        "tools-TOTAL_FORMS": "0",
        "tools-INITIAL_FORMS": "0",
        "tools-MIN_NUM_FORMS": "0",
        "tools-MAX_NUM_FORMS": "1000",
    }
    return {**data, **overrides}


# ------------------------------------------------------------------------------------- logs


def _console_handler():
    for handler in logging.getLogger().handlers:
        if any(isinstance(f, RedactSecretsFilter) for f in handler.filters):
            return handler
    raise AssertionError("LOGGING has no console handler with the redacting filter")


@contextmanager
def printed_logs(caplog, every_logger_at_debug=False):
    """What the configured console handler prints, with the root logger at DEBUG.

    `every_logger_at_debug` also lowers the loggers settings.LOGGING holds at WARNING because
    they log full URLs (the MCP SDK, httpx2, httpcore2): then only the filter stands between
    them and the log, which is the case being tested.
    """
    console, stream = _console_handler(), io.StringIO()
    previous = console.setStream(stream)
    caplog.set_level(logging.DEBUG)
    lowered = {}
    if every_logger_at_debug:
        for name in ("httpx2", "httpcore2", "mcp", "mcp_types", "uvicorn", "anyio", "celery"):
            lowered[name] = logging.getLogger(name).level
            logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        console.setStream(previous)
        for name, level in lowered.items():
            logging.getLogger(name).setLevel(level)


def filtered(records):
    """Each record as the console handler formats it: through its filters and formatter."""
    console, lines = _console_handler(), []
    for record in records:
        copy = logging.makeLogRecord(record.__dict__)
        if console.filter(copy):
            lines.append(console.format(copy))
    return "\n".join(lines)


def test_the_filter_redacts_an_httpx2_request_line():
    record = logging.LogRecord(
        "httpx2", logging.INFO, __file__, 1, 'HTTP Request: %s %s "%s"',
        ("POST", f"http://h/k/{PATH_SECRET}/mcp?key={QUERY_SECRET}", "HTTP/1.1 200 OK"), None,
    )  # fmt: skip
    assert RedactSecretsFilter().filter(record)
    assert record.getMessage() == 'HTTP Request: POST http://h/[redacted] "HTTP/1.1 200 OK"'
    assert redact(f"HTTP Request: POST http://h/mcp?key={QUERY_SECRET}") == (
        "HTTP Request: POST http://h/[redacted]"
    )
    assert redact(f"Authorization: Bearer {TOKEN}") == "Authorization: Bearer [redacted]"


def test_the_filter_redacts_tracebacks_too():
    try:
        raise RuntimeError(f"could not reach http://h/k/{PATH_SECRET}/mcp?key={QUERY_SECRET}")
    except RuntimeError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    text = filtered([record])
    assert "RuntimeError: could not reach http://h/[redacted]" in text
    assert_no_secrets(text, SERVER_SECRETS, "a logged traceback")


@pytest.mark.django_db
@pytest.mark.parametrize("every_logger_at_debug", [False, True], ids=["configured", "all-debug"])
def test_logs_hold_no_secrets_from_admin_sync_calls_and_the_api(
    every_logger_at_debug, caplog, mcp_factory, admin_client, client,
    django_capture_on_commit_callbacks,
):  # fmt: skip
    _running, url = secret_server(mcp_factory)
    with printed_logs(caplog, every_logger_at_debug) as printed:
        # An admin adds the server; the sync it queues is run here, in this process.
        with django_capture_on_commit_callbacks() as queued:
            response = admin_client.post("/admin/integrations/mcpserver/add/", server_form(url))
        assert response.status_code == 302
        assert len(queued) == 1
        server = McpServer.objects.get(name="secret")
        sync_server(server.pk)
        assert server.tools.count() == 5

        # Failing syncs: the wrong token (HTTP 401), and nobody listening at all.
        wrong = make_server(url, name="wrong", secret_token="wrong-" + TOKEN)
        sync_server(wrong.pk)
        dead = make_server(closed_port_url(), name="dead")
        sync_server(dead.pk)

        # An agent: first with a bad token, then a good one calling a tool; the call is run
        # in this process, as a worker would.
        _agent, agent_token = make_agent(server)
        bad = client.get("/api/v1/tools", headers={"Authorization": "Bearer tg_" + TOKEN})
        assert bad.status_code == 401
        body = {"server": "secret", "tool": "echo", "arguments": {"text": ARGUMENT_SECRET}}
        with django_capture_on_commit_callbacks():
            response = client.post(
                "/api/v1/tool-calls", json.dumps(body), content_type="application/json",
                headers={"Authorization": f"Bearer {agent_token}"},
            )  # fmt: skip
        assert response.status_code == 201, response.content
        call = ToolCall.objects.get()
        assert call.status == Status.APPROVED
        call.run()
        call.refresh_from_db()
        assert call.status == Status.SUCCEEDED

    wrong.refresh_from_db()
    dead.refresh_from_db()
    assert "HTTP 401" in wrong.last_error
    assert "Could not connect" in dead.last_error
    secrets = (*SERVER_SECRETS, agent_token, *settings_secrets())
    if not every_logger_at_debug:
        # The SDK logs every message it sends at DEBUG, tool arguments included: agents' data,
        # which the filter can't recognise. LOGGING keeps the `mcp` logger at WARNING.
        secrets += (ARGUMENT_SECRET,)
    output = printed.getvalue()
    # The capture works: the outcomes were logged, and with the libraries at DEBUG, the URLs.
    assert "Synced MCP server secret: 5 added" in output
    assert "Synced MCP server wrong: failed: http://127.0.0.1" in output
    assert "Unauthorized: /api/v1/tools" in output
    if every_logger_at_debug:
        assert "HTTP Request: POST http://127.0.0.1:" in output
    assert_no_secrets(output, secrets, "the console log")
    assert_no_secrets(filtered(caplog.records), secrets, "log records")


# ---------------------------------------------------------------------------- error reports


def _fail():
    raise RuntimeError("something broke")


def report(request, exc_info):
    """The error report as the debug page (HTML, text) and a mail to ADMINS would hold it."""
    reporter = ExceptionReporter(request, *exc_info)
    email = ExceptionReporter(request, *exc_info, is_email=True)
    pages = [reporter.get_traceback_html(), reporter.get_traceback_text()]
    return "\n".join([*pages, email.get_traceback_text()])


class _BrokenPattern:
    def match(self, text):
        _fail()


@pytest.mark.django_db
@pytest.mark.parametrize("debug", [False, True], ids=["production", "debug"])
@pytest.mark.parametrize("broken", ["validate_url", "parse_headers"])
def test_an_error_inside_the_server_form_reports_no_secrets(
    broken, debug, settings, admin_user, monkeypatch
):
    """A bug deep in the admin's form. The frames' variables hold what was just posted: `url`
    and the form's `cleaned` data in clean(); `text`, `line` and `value` in parse_headers().
    None of it reaches the report, in production or with DEBUG on."""
    settings.DEBUG = debug
    if broken == "validate_url":
        monkeypatch.setattr(netguard, "validate_url", lambda url, allow_http: _fail())
    else:
        monkeypatch.setattr(forms, "HEADER_NAME", _BrokenPattern())
    raised = []

    def keep(sender, request, **kwargs):
        raised.append((request, sys.exc_info()))

    client = Client(raise_request_exception=False)
    client.force_login(admin_user)
    got_request_exception.connect(keep)
    try:
        response = client.post(
            "/admin/integrations/mcpserver/add/",
            server_form(secret_url("https://mcp.example.com")),
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
    finally:
        got_request_exception.disconnect(keep)
    assert response.status_code == 500
    ((request, exc_info),) = raised
    assert request.sensitive_post_parameters == (
        "url", "secret_token", "headers_text", "oauth_client_secret"
    )  # fmt: skip
    text = report(request, exc_info)
    assert "something broke" in text
    # The frame is reported, with its variables listed and their values hidden.
    assert {"validate_url": "in clean", "parse_headers": "in parse_headers"}[broken] in text
    assert_no_secrets(text, (*SERVER_SECRETS, *settings_secrets()), "the error report")


@pytest.mark.parametrize("debug", [False, True], ids=["production", "debug"])
def test_an_error_report_hides_posted_secrets_auth_header_and_secret_settings(debug, settings):
    settings.DEBUG = debug
    settings.CELERY_BROKER_URL = f"redis://:{BROKER_PASSWORD}@redis:6379/0"
    agent_token = Agent().set_new_token()
    request = RequestFactory().post(
        "/admin/integrations/mcpserver/add/",
        {**server_form(secret_url("https://mcp.example.com")), "password": USER_PASSWORD},
        headers={"Authorization": f"Bearer {agent_token}"},
        # A WSGI server (runserver, gunicorn) passes the process environment on in META.
        DATABASE_URL=f"postgres://toolgate:{DATABASE_PASSWORD}@db/toolgate",
    )
    try:
        _fail()
    except RuntimeError:
        text = report(request, sys.exc_info())
    assert "something broke" in text
    for name in ("secret_token", "HTTP_AUTHORIZATION", "CELERY_BROKER_URL", "SECRET_KEY"):
        assert name in text  # listed, with the value hidden
    secrets = (
        *SERVER_SECRETS, *settings_secrets(), agent_token, USER_PASSWORD, BROKER_PASSWORD,
        DATABASE_PASSWORD,
    )  # fmt: skip
    assert_no_secrets(text, secrets, "the error report")


# ------------------------------------------------------------------- task messages, broker


@pytest.fixture
def private_broker(tmp_path, monkeypatch):
    """A broker no worker reads, with the tasks' `delay()` publishing to it, so what the code
    enqueues stays there to be read. Returns a function listing the queued messages, raw."""
    connection, _env, queue_folder = make_private_broker(tmp_path, "secret-leaks")

    def queued():
        if queue_folder is not None:
            return [path.read_text() for path in sorted(queue_folder.iterdir())]
        prefix = connection.transport_options["global_keyprefix"]  # LRANGE isn't prefixed
        messages = []
        for name in celery_app.amqp.queues:  # calls, syncs, notifications, celery
            raw = connection.default_channel.client.lrange(f"{prefix}{name}", 0, -1)
            messages += [message.decode() for message in reversed(raw)]  # LPUSHed: oldest last
        return messages

    for queue in celery_app.amqp.queues.values():
        queue(connection.default_channel).declare()
    for task in (sync_server, run_tool_call):
        monkeypatch.setattr(
            task,
            "delay",
            lambda *args, _task=task, **kwargs: _task.apply_async(
                args, kwargs, connection=connection
            ),
        )
    yield queued
    release_private_broker(connection, "secret-leaks")


def read_messages(raw_messages):
    """Each queued message as (task name, args, kwargs, the whole message as text)."""
    messages = []
    for raw in raw_messages:
        envelope = json.loads(raw)
        body = base64.b64decode(envelope["body"]).decode()
        args, kwargs, _embed = json.loads(body)
        messages.append((envelope["headers"]["task"], args, kwargs, raw + "\n" + body))
    return messages


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_queued_sync_carries_only_the_server_pk(private_broker, admin_client):
    response = admin_client.post(
        "/admin/integrations/mcpserver/add/", server_form(secret_url("https://mcp.example.com"))
    )
    assert response.status_code == 302
    server = McpServer.objects.get(name="secret")
    with transaction.atomic():
        server.request_sync()
    sync_all_servers()  # the periodic sync, as beat runs it

    messages = read_messages(private_broker())
    assert [message[:3] for message in messages] == [
        ("integrations.tasks.sync_server", [server.pk], {})
    ] * 3
    for *_, text in messages:
        assert_no_secrets(text, (*SERVER_SECRETS, *settings_secrets()), "a sync message")


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_queued_tool_call_carries_only_the_call_pk(private_broker, client, admin_user):
    url = secret_url("https://mcp.example.com")
    trusted = make_server(url, name="secret", approval_mode="no_approval")
    asking = make_server(url, name="asking")
    for server in (trusted, asking):
        Tool.objects.create_from_definition(server, ECHO, timezone.now())
    agent, agent_token = make_agent(trusted, asking)
    arguments = {"text": ARGUMENT_SECRET}

    # An agent calls a tool of a No Approval server through the API: queued at once.
    response = client.post(
        "/api/v1/tool-calls",
        json.dumps({"server": "secret", "tool": "echo", "arguments": arguments}),
        content_type="application/json",
        headers={"Authorization": f"Bearer {agent_token}"},
    )
    assert response.status_code == 201
    # The same from code, and a call an approver lets through.
    with transaction.atomic():
        direct, _ = request_tool_call(agent, "secret", "echo", arguments)
    pending, _ = request_tool_call(agent, "asking", "echo", arguments)
    assert pending.status == Status.PENDING_APPROVAL
    assert pending.approve(admin_user)

    calls = [response.json()["id"], direct.pk, pending.pk]
    messages = read_messages(private_broker())
    assert [message[:3] for message in messages] == [
        ("approvals.tasks.run_tool_call", [pk], {}) for pk in calls
    ]
    secrets = (*SERVER_SECRETS, agent_token, ARGUMENT_SECRET, *settings_secrets())
    for *_, text in messages:
        assert_no_secrets(text, secrets, "a tool-call message")


# ---------------------------------------------------------------------- a real worker's log


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_the_worker_log_holds_no_secrets(celery_worker, mcp_factory, admin_client, client):
    """The real worker process syncs a server added in the admin, fails to sync one with the
    wrong token, and runs an agent's call; its whole log (Celery's lines included) is clean."""
    _running, url = secret_server(mcp_factory)
    response = admin_client.post("/admin/integrations/mcpserver/add/", server_form(url))
    assert response.status_code == 302
    wait_until(lambda: McpServer.objects.get(name="secret").last_synced_at)
    wrong = make_server(url, name="wrong", secret_token="wrong-" + TOKEN)
    wrong.request_sync()
    _agent, agent_token = make_agent(McpServer.objects.get(name="secret"))
    response = client.post(
        "/api/v1/tool-calls?wait=20",
        json.dumps({"server": "secret", "tool": "echo", "arguments": {"text": ARGUMENT_SECRET}}),
        content_type="application/json",
        headers={"Authorization": f"Bearer {agent_token}"},
    )
    assert response.json()["status"] == "succeeded", response.json()
    wait_until(lambda: McpServer.objects.get(name="wrong").last_error)

    log = wait_until(
        lambda: "Synced MCP server wrong" in (text := celery_worker.log.read_text()) and text
    )
    assert "Synced MCP server secret: 5 added" in log
    assert "run_tool_call" in log
    secrets = (*SERVER_SECRETS, agent_token, ARGUMENT_SECRET, *settings_secrets())
    assert_no_secrets(log, secrets, "the worker's log")


# ------------------------------------------------ server errors on admin pages and to agents


@dataclass
class _Echo:
    """Errors that repeat what the server was sent: the full URL, the token, the header.

    "http_500": HTTP 500, an HTML page quoting the request. "jsonrpc": a JSON-RPC error whose
    message names the key and the token it refused. "jsonrpc_long": the same message after
    filler, so the 300-character cut falls just after the key in the URL's path. Replies the
    SDK can't use, and logs as they came: "sse_event", an SSE event named after the refusal;
    "sse_not_jsonrpc", an SSE message that is no JSON-RPC message; "content_type", a body of
    a content type naming it.
    With `inner`, only `tools/call` gets the error; everything else goes to `inner`.
    """

    kind: str
    inner: object = None

    def build_asgi_app(self, transport):
        inner = self.inner and _UnderSecretPath(self.inner).build_asgi_app(transport)

        async def handler(scope, receive, send):
            body = b""
            while (message := await receive())["type"] == "http.request":
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            request = json.loads(body) if body.startswith(b"{") else {}
            if inner and request.get("method") != "tools/call":
                sent = []

                async def replay():  # the body once, then what the client does next
                    if sent:
                        return await receive()
                    sent.append(body)
                    return {"type": "http.request", "body": body, "more_body": False}

                return await inner(scope, replay, send)
            await self.error(scope, request)(scope, receive, send)

        async def app(scope, receive, send):
            if scope["type"] == "http":
                return await handler(scope, receive, send)
            await (inner or _plain_http(handler))(scope, receive, send)  # lifespan

        return app

    def error(self, scope, request):
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        query = scope["query_string"].decode()
        full_url = f"http://{headers['host']}{scope['path']}?{query}"
        token = headers.get("authorization", "").removeprefix("Bearer ")
        said = f"{full_url} Authorization: Bearer {token} X-Api-Key: {headers.get('x-api-key')}"
        if self.kind == "http_500":
            return Response(f"<h1>Internal error</h1><p>{scope['method']} {said}", 500)
        text = f"refused {full_url}: unknown key {query.partition('=')[2]}, token {token}"
        if self.kind == "jsonrpc_long":
            end_of_key = text.index(PATH_SECRET) + len(PATH_SECRET)
            text = "x" * (299 - end_of_key) + " " + text
        if self.kind == "sse_event":
            return Response(f"event: {text}\ndata: {{}}\n\n", media_type="text/event-stream")
        if self.kind == "sse_not_jsonrpc":
            data = json.dumps({"jsonrpc": "2.0", "id": request.get("id"), "refused": text})
            return Response(f"event: message\ndata: {data}\n\n", media_type="text/event-stream")
        if self.kind == "content_type":
            return Response("refused", headers={"content-type": f"text/plain; refused={text}"})
        error = {"code": -32001, "message": text}
        return JSONResponse({"jsonrpc": "2.0", "id": request.get("id"), "error": error})


ECHO_KINDS = ["http_500", "jsonrpc", "jsonrpc_long"]


@pytest.mark.django_db
@pytest.mark.parametrize("kind", ECHO_KINDS)
def test_a_sync_error_echoing_the_request_reaches_no_admin_page_or_log(
    kind, mcp_factory, admin_client, caplog
):
    running = mcp_factory(_Echo(kind))
    server = make_server(secret_url(running.base_url), name="echo")
    with printed_logs(caplog) as printed:
        sync_server(server.pk)
    server.refresh_from_db()
    assert server.last_error.startswith(f"http://127.0.0.1:{running.port} over Streamable HTTP")
    pages = [
        "/admin/integrations/mcpserver/",
        f"/admin/integrations/mcpserver/{server.pk}/change/",
        f"/admin/integrations/mcpserver/{server.pk}/sync-status/",
    ]
    for page in pages:
        html = admin_client.get(page).content.decode()
        assert server.last_error[:40] in html
        assert_no_secrets(html, SERVER_SECRETS, page)
    assert_no_secrets(server.last_error, SERVER_SECRETS, "last_error")
    assert_no_secrets(printed.getvalue(), SERVER_SECRETS, "the log")


def _echoing_call(kind, mcp_factory):
    """(call to `echo`, stored and auto-approved, the agent's token) on a server that answers
    with what it was sent (`_Echo(kind)`), its token and header among it."""
    running = mcp_factory(
        _Echo(kind, protected_server(token=TOKEN, header=("X-Api-Key", HEADER_VALUE)))
    )
    server = make_server(secret_url(running.base_url), approval_mode="no_approval")
    assert server.sync_tools().ok
    agent, agent_token = make_agent(server)
    call, _ = request_tool_call(agent, "secret", "echo", {"text": "hi"})
    return call, agent_token


@pytest.mark.django_db
@pytest.mark.parametrize("kind", ECHO_KINDS)
def test_a_tool_call_error_echoing_the_request_does_not_reach_the_agent(kind, mcp_factory, client):
    call, agent_token = _echoing_call(kind, mcp_factory)
    call.run()
    call.refresh_from_db()
    assert call.status == Status.FAILED
    answer = client.get(
        f"/api/v1/tool-calls/{call.pk}", headers={"Authorization": f"Bearer {agent_token}"}
    ).content.decode()
    assert call.error_message[:40] in answer
    assert_no_secrets(answer, SERVER_SECRETS, "the agent's answer")


BOTCHED_KINDS = ["sse_event", "sse_not_jsonrpc", "content_type"]


@pytest.mark.django_db
@pytest.mark.parametrize("pooled", [True, False], ids=["pooled", "fresh"])
@pytest.mark.parametrize("kind", BOTCHED_KINDS)
def test_a_botched_reply_echoing_the_request_reaches_no_log(
    kind, pooled, mcp_factory, caplog, settings
):
    """The SDK logs an unknown SSE event's name, an unexpected content type and a message it
    could not parse as the server sent them: the server's own secrets in them were logged
    as they came, without "Bearer " or a URL around them for the filter to recognise."""
    if not pooled:
        settings.MCP_POOL_SESSIONS = 0
    call, _ = _echoing_call(kind, mcp_factory)
    with printed_logs(caplog) as printed:
        call.run()
    call.refresh_from_db()
    assert call.status == Status.FAILED
    logged = printed.getvalue()
    assert "mcp.client.streamable_http" in logged  # the SDK logged what it got
    secrets = [secret.lower() for secret in SERVER_SECRETS]  # a content type comes lowercased
    assert_no_secrets(logged.lower(), secrets, "the log")


# ------------------------------------------------- credentials a server sends back (item 3)


def _encoded_forms(secret):
    """How a hostile server might hand a secret back: plain, URL-encoded, base64 alone or
    inside a Basic credential or a longer blob, URL-safe base64, hex-percent-encoded."""
    raw = secret.encode()
    return [
        secret,
        quote(secret, safe=""),
        "".join(f"%{byte:02X}" for byte in raw),
        base64.b64encode(raw).decode(),
        base64.b64encode(b"user:" + raw).decode(),
        base64.urlsafe_b64encode(b"xy" + raw + b"-tail").decode(),
    ]


def _leaked_forms(text, secrets):
    """Which of the secrets appear in `text` in any form a test server sends them in, keeping
    only the part of a base64 form that depends on the secret alone."""
    found = []
    for secret in secrets:
        for form in (secret, quote(secret, safe="")):
            if form in text:
                found.append(form)
        for offset in range(3):
            core = base64.b64encode(b"\0" * offset + secret.encode()).decode().rstrip("=")
            core = core[(0, 2, 3)[offset] : -1]
            for variant in (core, core.translate(str.maketrans("+/", "-_"))):
                if variant in text:
                    found.append(variant)
    return found


def _echoing_credentials_server():
    """A server that hands its own credentials back in every kind of reply: tool results,
    `isError` results, structured content, embedded resources, the tool's description and
    its server name, each secret in several encodings."""
    full_url_path = f"/k/{PATH_SECRET}/mcp?key={QUERY_SECRET}"
    said = " ".join(
        [f"rejected Bearer {TOKEN} / x-api-key={HEADER_VALUE} at {full_url_path}"]
        + [form for secret in SERVER_SECRETS for form in _encoded_forms(secret)]
    )
    tool = mcp_types.Tool(
        name="whoami",
        description=f"Says who you are. Debug: Authorization: Bearer {TOKEN}",
        input_schema={"type": "object", "properties": {"mode": {"type": "string"}}},
    )

    async def list_tools(ctx, params):
        return mcp_types.ListToolsResult(tools=[tool])

    async def call_tool(ctx, params):
        mode = (params.arguments or {}).get("mode")
        resource = mcp_types.EmbeddedResource(
            type="resource",
            resource=mcp_types.TextResourceContents(
                uri=f"https://example.com/echo?key={QUERY_SECRET}", text=said
            ),
        )
        return mcp_types.CallToolResult(
            content=[mcp_types.TextContent(type="text", text=said), resource],
            structured_content={"said": said, TOKEN: {"header": HEADER_VALUE}},
            is_error=mode == "error",
        )

    return Server(f"echo-{TOKEN}", on_list_tools=list_tools, on_call_tool=call_tool)


@pytest.mark.django_db
@pytest.mark.parametrize("mode", ["text", "error"])
def test_credentials_a_server_sends_back_reach_no_agent_page_or_row(
    mode, mcp_factory, client, admin_client
):
    running = mcp_factory(
        _UnderSecretPath(
            protected_server(
                token=TOKEN,
                header=("X-Api-Key", HEADER_VALUE),
                inner=_echoing_credentials_server(),
            )
        )
    )
    server = make_server(secret_url(running.base_url), approval_mode="no_approval")
    assert server.sync_tools().ok
    tool = Tool.objects.get(server=server, name="whoami")
    assert "[redacted]" in tool.description
    assert not _leaked_forms(json.dumps([tool.definition, server.server_info]), SERVER_SECRETS)
    agent, agent_token = make_agent(server)
    listed = client.get("/api/v1/tools", headers={"Authorization": f"Bearer {agent_token}"})
    assert not _leaked_forms(listed.content.decode(), SERVER_SECRETS)

    call, _ = request_tool_call(agent, "secret", "whoami", {"mode": mode})
    ToolCall.objects.get(pk=call.pk).run()
    call.refresh_from_db()
    assert call.status == Status.SUCCEEDED
    assert call.is_error is (mode == "error")
    stored = json.dumps([call.result_content, call.structured_content, call.error_message])
    assert "rejected [redacted] / x-api-key=[redacted]" in stored
    assert not _leaked_forms(stored, SERVER_SECRETS)
    answer = client.get(
        f"/api/v1/tool-calls/{call.pk}", headers={"Authorization": f"Bearer {agent_token}"}
    ).content.decode()
    assert "rejected [redacted]" in answer
    assert not _leaked_forms(answer, SERVER_SECRETS)
    for page in ["/approvals/history/", f"/approvals/{call.pk}/state"]:
        html = admin_client.get(page).content.decode()
        assert not _leaked_forms(html, SERVER_SECRETS), page


def test_redaction_leaves_ordinary_words_of_the_url_alone():
    from integrations.mcp_client import Endpoint

    endpoint = Endpoint(
        url="https://mcp.example.com/customers/mcp?format=json",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    text = "Customers are listed at http://mcp.example.com/customers/mcp as json."
    assert endpoint.redact(text) == text
    assert endpoint.redact(f"http://mcp-{TOKEN}.example") == "http://mcp-[redacted].example"


@pytest.mark.parametrize("size", ["short", "long"])
def test_a_reply_is_redacted_in_every_form_whatever_its_length(size):
    # A short reply is first scanned form by form, a long one goes to RE2 at once.
    from integrations.mcp_client import Endpoint

    endpoint = Endpoint(
        url=secret_url("https://mcp.example.com"),
        headers={"Authorization": f"Bearer {TOKEN}", "X-Api-Key": HEADER_VALUE},
    )
    padding = "" if size == "short" else "x" * 10_000
    for secret in SERVER_SECRETS:
        for form in _encoded_forms(secret):
            said = endpoint.redact(f"{padding}said {form} ok")
            assert "[redacted]" in said and not _leaked_forms(said, SERVER_SECRETS), form
