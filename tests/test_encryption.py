import io
import threading

import pytest
from cryptography.fernet import Fernet
from django.core.exceptions import FieldError
from django.core.management import call_command
from django.db import connection

from integrations.fields import DecryptionError
from integrations.models import McpServer
from tests.conftest import before_migration, migrate_to_latest

URL = "https://mcp.example.com/v1/k-SECRETPATH-123"
TOKEN = "tok-VERYSECRET-456"


@pytest.fixture
def server(db):
    return McpServer.objects.create(
        name="s", url=URL, secret_token=TOKEN, headers={"X-Api-Key": "hdr-SECRET-789"}
    )


def raw_row(server):
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT url, secret_token, headers FROM integrations_mcpserver WHERE id = %s",
            [server.pk],
        )
        return " ".join(cursor.fetchone())


def test_it_stores_secrets_encrypted(server):
    row = raw_row(server)
    for secret in ("SECRETPATH", "VERYSECRET", "hdr-SECRET", "mcp.example.com"):
        assert secret not in row


def test_it_reads_secrets_back(server):
    server = McpServer.objects.get(pk=server.pk)
    assert server.url == URL
    assert server.secret_token == TOKEN
    assert server.headers == {"X-Api-Key": "hdr-SECRET-789"}


def test_a_wrong_key_raises_instead_of_returning_ciphertext(server, settings):
    settings.FIELD_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]
    with pytest.raises(DecryptionError, match="could not be decrypted"):
        McpServer.objects.get(pk=server.pk)


def test_a_missing_key_fails_loudly(server, settings):
    settings.FIELD_ENCRYPTION_KEYS = []
    with pytest.raises(Exception, match="FIELD_ENCRYPTION_KEYS is empty"):
        McpServer.objects.get(pk=server.pk)


def test_rotation_reencrypts_with_the_new_key(server, settings):
    old = settings.FIELD_ENCRYPTION_KEYS[0]
    new = Fernet.generate_key().decode()
    settings.FIELD_ENCRYPTION_KEYS = [new, old]
    assert McpServer.objects.get(pk=server.pk).url == URL  # old rows stay readable
    call_command("rotate_encryption_keys", stdout=io.StringIO())
    settings.FIELD_ENCRYPTION_KEYS = [new]  # the old key can now go
    server = McpServer.objects.get(pk=server.pk)
    assert (server.url, server.secret_token) == (URL, TOKEN)


def test_encrypted_fields_refuse_lookups_that_could_never_match(server):
    with pytest.raises(FieldError, match="encrypted"):
        McpServer.objects.filter(secret_token=TOKEN).count()


def test_empty_token_is_stored_as_empty(db):
    server = McpServer.objects.create(name="plain", url=URL)
    assert McpServer.objects.filter(pk=server.pk, secret_token__isnull=False).exists()
    assert McpServer.objects.get(pk=server.pk).secret_token == ""


def test_fields_are_safe_under_threads(transactional_db):
    """Many threads saving and reading different secrets never see each other's values."""
    servers = [
        McpServer.objects.create(name=f"t{i}", url=f"https://h{i}.example/{i}") for i in range(8)
    ]
    errors = []

    def worker(server):
        try:
            for round_ in range(10):
                token = f"token-{server.pk}-{round_}"
                McpServer.objects.filter(pk=server.pk).update(secret_token=token)
                assert McpServer.objects.get(pk=server.pk).secret_token == token
        except Exception as exc:  # collected and asserted on below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(s,)) for s in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


# Arguments and results (issue 9 item 11) ----------------------------------------------------

ARGUMENT = "alice-PERSONAL-4242@example.com"
RESULT = "result-PERSONAL-9191"


ERROR = "bad recipient alice-PERSONAL-4242"
ELICITED = "Confirm the PERSONAL card number 4242"


@pytest.fixture
def call(server):
    from django.utils import timezone

    from approvals.models import Status, ToolCall
    from integrations.models import Agent, Tool

    tool = Tool.objects.create_from_definition(
        server, {"name": "send", "inputSchema": {"type": "object"}}, timezone.now()
    )
    agent, _ = Agent.create_with_token("bot", [server])
    return ToolCall.objects.create(
        agent=agent, server=server, tool=tool, server_name="s", tool_name="send",
        status=Status.SUCCEEDED, arguments={"to": ARGUMENT},
        result_content=[{"type": "text", "text": RESULT}], structured_content={"r": RESULT},
        error_code="upstream_error", error_message=ERROR,
        declined_requests=[{"method": "elicitation/create", "message": ELICITED}],
        finished_at=timezone.now(),
    )  # fmt: skip


def raw_call(call):
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT arguments, result_content, structured_content, error_message, "
            "declined_requests FROM approvals_toolcall WHERE id = %s",
            [call.pk],
        )
        return " ".join(str(value) for value in cursor.fetchone())


def test_arguments_and_results_are_stored_encrypted(call):
    row = raw_call(call)
    assert ARGUMENT not in row and "PERSONAL" not in row
    assert RESULT not in row
    call.refresh_from_db()
    assert call.arguments == {"to": ARGUMENT}
    assert call.result_content == [{"type": "text", "text": RESULT}]


def test_error_texts_and_declined_requests_are_stored_encrypted(call, client):
    """An upstream's error and an elicitation's text can echo the arguments."""
    row = raw_call(call)
    assert "PERSONAL" not in row and "elicitation" not in row
    call.refresh_from_db()
    assert call.error_message == ERROR
    assert call.declined_requests == [{"method": "elicitation/create", "message": ELICITED}]
    token = call.agent.rotate_token()
    answer = client.get(
        f"/api/v1/tool-calls/{call.pk}", headers={"Authorization": f"Bearer {token}"}
    )
    assert answer.json()["error"] == {"code": "upstream_error", "message": ERROR}


def test_the_api_queue_and_history_still_show_them(call, client, admin_client):
    from approvals.models import Status, ToolCall, request_tool_call

    token = call.agent.rotate_token()
    answer = client.get(
        f"/api/v1/tool-calls/{call.pk}", headers={"Authorization": f"Bearer {token}"}
    )
    assert answer.json()["arguments"] == {"to": ARGUMENT}
    assert answer.json()["result"]["content"][0]["text"] == RESULT
    assert RESULT in admin_client.get("/approvals/history/").content.decode()
    pending, _ = request_tool_call(call.agent, "s", "send", {"to": ARGUMENT})
    assert pending.status == Status.PENDING_APPROVAL
    assert ARGUMENT in admin_client.get("/approvals/").content.decode()
    assert ARGUMENT not in raw_call(pending)
    assert ToolCall.objects.get(pk=pending.pk).arguments_size == len('{"to":""}') + len(ARGUMENT)


def test_retention_purges_encrypted_arguments_and_results(call):
    from datetime import timedelta

    from approvals.models import ToolCall

    ToolCall.objects.filter(pk=call.pk).update(finished_at=call.finished_at - timedelta(days=40))
    assert ToolCall.purge_old_data(days=30) == 1
    call.refresh_from_db()
    assert (call.arguments, call.result_content, call.structured_content) == ({}, None, None)
    assert call.purged_at is not None


def test_rotation_reencrypts_arguments_and_results(call, settings):
    from approvals.models import ToolCall

    new = Fernet.generate_key().decode()
    settings.FIELD_ENCRYPTION_KEYS = [new, settings.FIELD_ENCRYPTION_KEYS[0]]
    call_command("rotate_encryption_keys", stdout=io.StringIO())
    settings.FIELD_ENCRYPTION_KEYS = [new]
    assert ToolCall.objects.get(pk=call.pk).arguments == {"to": ARGUMENT}


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_the_migration_encrypts_the_calls_stored_in_clear():
    calls, server, agent = before_migration("0008_anomalies_and_metric_totals")
    old_call = calls.create(
        agent=agent, server=server, server_name="s", tool_name="t", status="succeeded",
        arguments={"to": ARGUMENT}, result_content=[{"type": "text", "text": RESULT}],
    )  # fmt: skip
    assert ARGUMENT in raw_call(old_call)  # in clear before
    migrate_to_latest()

    from approvals.models import ToolCall

    assert ARGUMENT not in raw_call(old_call) and RESULT not in raw_call(old_call)
    migrated = ToolCall.objects.get(pk=old_call.pk)
    assert migrated.arguments == {"to": ARGUMENT}
    assert migrated.result_content == [{"type": "text", "text": RESULT}]
    assert migrated.structured_content is None
    assert migrated.arguments_size == len(f'{{"to":"{ARGUMENT}"}}')


WARNING = {"code": "instructions", "message": f"Reads like an order: '{RESULT}'", "field": "result"}


def test_result_warnings_are_stored_encrypted_and_shown_to_approvers(call, client, admin_client):
    from approvals.models import ToolCall

    ToolCall.objects.filter(pk=call.pk).update(warnings=[WARNING])
    with connection.cursor() as cursor:
        cursor.execute("SELECT warnings FROM approvals_toolcall WHERE id = %s", [call.pk])
        (raw,) = cursor.fetchone()
    assert RESULT not in str(raw) and "order" not in str(raw)
    assert ToolCall.objects.get(pk=call.pk).warnings == [WARNING]

    page = admin_client.get(f"/admin/approvals/toolcall/{call.pk}/change/").content.decode()
    assert f"Reads like an order: &#x27;{RESULT}&#x27;" in page
    token = call.agent.rotate_token()
    answer = client.get(
        f"/api/v1/tool-calls/{call.pk}", headers={"Authorization": f"Bearer {token}"}
    )
    assert answer.json()["warnings"] == [WARNING]


def test_staff_who_may_not_decide_calls_do_not_see_the_warnings(call, client, django_user_model):
    from django.contrib.auth.models import Permission

    from approvals.models import ToolCall

    ToolCall.objects.filter(pk=call.pk).update(warnings=[WARNING])
    viewer = django_user_model.objects.create_user("viewer", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_toolcall"))
    client.force_login(viewer)
    page = client.get(f"/admin/approvals/toolcall/{call.pk}/change/").content.decode()
    assert "Warnings about the result" in page and "Shown only to approvers." in page
    assert RESULT not in page and "Reads like an order" not in page


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_the_migration_encrypts_the_warnings_stored_in_clear():
    calls, server, agent = before_migration("0009_encrypt_arguments_and_results")
    old_call = calls.create(
        agent=agent, server=server, server_name="s", tool_name="t", status="succeeded",
        warnings=[WARNING],
    )  # fmt: skip
    plain = calls.create(agent=agent, server=server, server_name="s", tool_name="t")

    def raw(pk):
        with connection.cursor() as cursor:
            cursor.execute("SELECT warnings FROM approvals_toolcall WHERE id = %s", [pk])
            return str(cursor.fetchone()[0])

    assert RESULT in raw(old_call.pk)  # in clear before
    migrate_to_latest()

    from approvals.models import ToolCall

    assert RESULT not in raw(old_call.pk)
    assert ToolCall.objects.get(pk=old_call.pk).warnings == [WARNING]
    assert ToolCall.objects.get(pk=plain.pk).warnings == []


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_the_migration_encrypts_error_texts_and_declined_requests():
    calls, _, agent = before_migration("0010_encrypt_warnings")
    declined = [{"method": "elicitation/create", "message": ELICITED}]
    fields = {"agent": agent, "server_name": "s", "tool_name": "t", "status": "failed"}
    failed = calls.create(**fields, error_code="upstream_error", error_message=ERROR)
    elicited = calls.create(**fields, declined_requests=declined)
    plain = calls.create(**fields)
    assert ERROR in raw_call(failed) and ELICITED in raw_call(elicited)  # in clear before
    migrate_to_latest()

    from approvals.models import ToolCall

    assert "PERSONAL" not in raw_call(failed) + raw_call(elicited)
    assert ToolCall.objects.get(pk=failed.pk).error_message == ERROR
    assert ToolCall.objects.get(pk=failed.pk).declined_requests == []
    assert ToolCall.objects.get(pk=elicited.pk).declined_requests == declined
    assert ToolCall.objects.get(pk=plain.pk).error_message == ""
