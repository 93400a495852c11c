"""No admin page shows a stored secret, to anyone (issue 9 item 1).

One walk over every admin URL of every model registered in the admin (and every inline on
their pages), with a sample row for each model that has encrypted fields, as a superuser and
as staff users with each combination of view and change permission (with and without add and
delete), on GET and on a form post that fails validation. Every value of every encrypted
field is a unique marker; seeing one, in any usual encoding, anywhere in a response is a leak.

A new model with encrypted fields must add a sample row to SAMPLES: the walk fails loudly
until it does, so every model's secrets are covered from the day it lands.
"""

import html
import json
from urllib.parse import quote, quote_plus

import pytest
from django.apps import apps
from django.contrib import admin
from django.contrib.auth.models import Permission
from django.urls import URLPattern, URLResolver, reverse
from django.utils import timezone

from integrations.models import Agent, McpServer, Tool
from integrations.secret_admin import secret_field_names

pytestmark = pytest.mark.django_db


def marker(name):
    return f"Secret{name.title().replace('_', '')}Qz7"


def make_server(name="leaky"):
    secrets = [marker(f"{name}_path"), marker(f"{name}_query"), marker(f"{name}_token")]
    secrets.append(marker(f"{name}_header"))
    server = McpServer.objects.create(
        name=name,
        url=f"https://mcp.example.com/k/{secrets[0]}/mcp?key={secrets[1]}",
        secret_token=secrets[2],
        headers={"X-Api-Key": secrets[3]},
    )
    Tool.objects.create_from_definition(
        server, {"name": "echo", "inputSchema": {"type": "object"}}, timezone.now()
    )
    return server, secrets


def make_oauth_server():
    """An OAuth server: its page shows the credential's state, never the credential."""
    from integrations.oauth import OAuthAuthorization, OAuthCredential

    server, secrets = make_server("oauthed")
    server.auth_kind = "oauth"
    server.secret_token = ""
    server.save()
    names = ["client_secret", "registration", "resource", "access_token", "refresh_token"]
    names.append("verifier")
    secrets = [s for s in secrets if "Token" not in s] + [marker(n) for n in names]
    credential = OAuthCredential.objects.create(
        server=server, client_id="toolgate-client", client_secret=secrets[-6],
        client_registration={"client_secret": secrets[-5]},
        resource_metadata={"resource": secrets[-4]},
        access_token=secrets[-3], refresh_token=secrets[-2],
    )  # fmt: skip
    OAuthAuthorization.objects.create(
        credential=credential, state_hash="0" * 64, code_verifier=secrets[-1],
        client_id="toolgate-client", metadata={}, expires_at=timezone.now(),
    )  # fmt: skip
    return server, secrets


# A tool call's arguments and result are not credentials: approvers (and superusers) see them,
# on the audit page as on the approvers' pages. Nobody else does, and no credential is shown.
CALL_DATA = {
    marker("requested"), marker("argument"), marker("result"), marker("structured"),
    marker("error"), marker("elicited"),
}  # fmt: skip
CALL_PAGE = "/admin/approvals/toolcall/"


def make_tool_call():
    from approvals.models import Status, ToolCall

    server, secrets = make_server("called")
    agent, _ = Agent.create_with_token("bot", [server])
    secrets += [marker("requested"), marker("argument"), marker("result"), marker("structured")]
    secrets += [marker("error"), marker("elicited")]
    call = ToolCall.objects.create(
        agent=agent,
        server=server,
        tool=server.tools.get(),
        server_name=server.name,
        tool_name="echo",
        status=Status.SUCCEEDED,
        requested_arguments={"to": secrets[-6]},
        arguments={"to": secrets[-5]},
        result_content=[{"type": "text", "text": secrets[-4]}],
        structured_content={"said": secrets[-3]},
        error_code="upstream_error",
        error_message=f"The server said: bad address {secrets[-2]}",
        declined_requests=[{"method": "elicitation/create", "message": secrets[-1]}],
    )
    return call, secrets


def make_channel():
    from approvals.notifications import NotificationChannel

    secrets = [marker("hook_path"), marker("hook_query"), marker("signing")]
    channel = NotificationChannel.objects.create(
        name="hooks",
        kind="webhook",
        url=f"https://hooks.example.com/services/{secrets[0]}/in?sig={secrets[1]}",
        secret=secrets[2],
    )
    return channel, secrets


# model label -> a function making one row whose every encrypted field holds markers, returning
# (the row, the markers). Add yours here when a model gains an encrypted field.
SAMPLES = {
    "integrations.mcpserver": make_server,
    "approvals.toolcall": make_tool_call,
    "approvals.notificationchannel": make_channel,
}


def registered_models():
    """Every model the admin shows: registered ones and those of their inlines."""
    found = {}
    for model in apps.get_models():
        if admin.site.is_registered(model):
            model_admin = admin.site.get_model_admin(model)
            found[model] = model_admin
            for inline in model_admin.inlines:
                found.setdefault(inline.model, None)
    return found


def models_with_secrets():
    return [model for model in registered_models() if secret_field_names(model)]


def test_every_model_with_encrypted_fields_has_a_sample_row():
    missing = [
        m._meta.label_lower for m in models_with_secrets() if m._meta.label_lower not in SAMPLES
    ]
    assert not missing, (
        f"{missing} have encrypted fields but no sample row in tests/test_admin_secrets.py "
        "SAMPLES: add one so the admin walk checks their secrets are never shown."
    )
    assert {"integrations.mcpserver", "approvals.toolcall"} <= {
        m._meta.label_lower for m in models_with_secrets()
    }


def forms_of(secret):
    """The ways a page could carry a secret: as is, HTML-escaped, URL- and JSON-encoded."""
    return {secret, html.escape(secret), quote(secret, safe=""), quote_plus(secret),
            json.dumps(secret)[1:-1]}  # fmt: skip


def admin_urls(model, pk):
    """Every admin URL of `model`: the standard views and the admin's own extra ones."""
    opts = model._meta
    info = (opts.app_label, opts.model_name)
    urls = [
        reverse(f"admin:{info[0]}_{info[1]}_changelist"),
        reverse(f"admin:{info[0]}_{info[1]}_add"),
    ]
    urls += [
        reverse(f"admin:{info[0]}_{info[1]}_{view}", args=[pk])
        for view in ("change", "history", "delete")
    ]
    changelist = urls[0]
    urls += [f"{changelist}?_popup=1", f"{changelist}?q=Secret", f"{changelist}?o=1",
             f"{changelist}?all=", f"{urls[2]}?_popup=1", f"{urls[1]}?_popup=1"]  # fmt: skip
    model_admin = admin.site.get_model_admin(model)
    standard = {"changelist", "add", "change", "history", "delete", "autocomplete"}
    for pattern in model_admin.get_urls():
        if isinstance(pattern, URLResolver) or not pattern.name:
            continue
        if any(pattern.name.endswith(f"_{view}") for view in standard):
            continue
        urls.append(_extra_url(pattern, pk))
    return urls


def _extra_url(pattern: URLPattern, pk):
    arguments = list(pattern.pattern.converters)
    return reverse(f"admin:{pattern.name}", args=[pk] * len(arguments))


USERS = [
    ("view",), ("change",), ("view", "change"),
    ("view", "add", "delete"), ("change", "add", "delete"), ("view", "change", "add", "delete"),
]  # fmt: skip


def staff_user(django_user_model, actions):
    user = django_user_model.objects.create_user(
        "staff-" + "-".join(actions), password="pw-staff-123", is_staff=True
    )
    codenames = [
        f"{action}_{model._meta.model_name}" for model in registered_models() for action in actions
    ]
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    return user


def test_no_admin_page_shows_a_stored_secret(client, django_user_model, admin_user):
    samples, secrets = {}, []
    for model in models_with_secrets():
        row, markers = SAMPLES[model._meta.label_lower]()
        samples[model] = row.pk
        secrets += markers
    oauth_server, markers = make_oauth_server()
    secrets += markers
    users = [admin_user] + [staff_user(django_user_model, actions) for actions in USERS]
    pages = [model for model in registered_models() if admin.site.is_registered(model)]
    leaks, visited = [], 0
    for user in users:
        client.force_login(user)
        for model in pages:
            pk = samples.get(model) or model.objects.values_list("pk", flat=True).first() or 1
            urls = admin_urls(model, pk)
            if model is McpServer:
                urls += admin_urls(model, oauth_server.pk)
            for url in urls:
                for response in _responses(client, url):
                    visited += 1
                    method = response.request["REQUEST_METHOD"]
                    shown = secrets
                    if user.has_perm("approvals.decide_toolcall") and url.startswith(CALL_PAGE):
                        shown = [secret for secret in secrets if secret not in CALL_DATA]
                    leaks += _leaks(response, shown, f"{user.username} {method} {url}")
    assert not leaks, "\n".join(leaks[:20])
    assert visited > 300


def _responses(client, url):
    """GET, and for a form page also a post that fails validation, so the form is rendered
    again with what was sent."""
    yield client.get(url)
    if url.endswith(("/change/", "/add/")):
        yield client.post(url, {"name": "", "url": "not a url", "_save": "Save"})


def _leaks(response, secrets, where):
    body = response.content.decode(errors="replace")
    body += " ".join(f"{k}: {v}" for k, v in response.headers.items())
    return [
        f"{where}: {secret!r}" for secret in secrets for form in forms_of(secret) if form in body
    ]


def test_a_view_only_user_sees_that_a_secret_is_stored_not_what_it_is(client, django_user_model):
    server, secrets = make_server()
    client.force_login(staff_user(django_user_model, ("view",)))
    page = client.get(f"/admin/integrations/mcpserver/{server.pk}/change/").content.decode()
    assert "Stored (hidden)" in page
    assert not any(secret in page for secret in secrets)


def test_a_change_without_retyping_the_secrets_keeps_them(admin_client):
    from tests.test_server_admin import form_data

    server, secrets = make_server()
    data = form_data(name="renamed", url="", secret_token="")
    response = admin_client.post(f"/admin/integrations/mcpserver/{server.pk}/change/", data)
    assert response.status_code == 302, response.content.decode()[:2000]
    server.refresh_from_db()
    assert server.name == "renamed"
    assert server.secret_token == secrets[2]
    assert secrets[0] in server.url


def test_only_approvers_see_a_calls_arguments_and_result_on_its_audit_page(
    client, django_user_model, admin_user
):
    call, _ = make_tool_call()
    url = f"{CALL_PAGE}{call.pk}/change/"
    auditor = staff_user(django_user_model, ("view",))
    approver = staff_user(django_user_model, ("change",))
    approver.user_permissions.add(Permission.objects.get(codename="decide_toolcall"))
    for user, sees in ((admin_user, True), (approver, True), (auditor, False)):
        client.force_login(user)
        page = client.get(url).content.decode()
        assert (marker("argument") in page, marker("result") in page) == (sees, sees), user
        assert ("Shown only to approvers" in page) != sees
