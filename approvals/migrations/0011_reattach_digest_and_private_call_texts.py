"""Two changes to tool calls, in one file (one migration per branch).

1. An MCP client's repeat of a call re-attaches by a keyed digest of the requested arguments
   (`ToolCall.twin_to_reattach`), not by decrypting every candidate's arguments. Only calls
   that can still be re-attached to get a digest here: those that waited for a human and are
   not finished (a finished call is re-attachable only after a hand-back, which no call has
   yet). Their requested arguments are those an approver's edit replaced, if any.
2. The call data 0009 left in clear is encrypted like the arguments: the declined requests
   (an elicitation's text) and the error message (an upstream's error can echo the
   arguments). The error column stays text: its values are encrypted in place, then the field
   becomes encrypted. The declined requests move to a new encrypted column, as in 0009; it is
   added with "[]" (one ciphertext) and only rows that declined something are copied.
"""

from django.db import migrations, models

import integrations.fields
from approvals.models import _digest
from integrations.fields import decrypt, encrypt
from integrations.limits import canonical_json

BATCH = 500


def digest_open_calls(apps, schema_editor):
    ToolCall = apps.get_model("approvals", "ToolCall")
    open_calls = ToolCall.objects.filter(finished_at__isnull=True, expires_at__isnull=False)
    for call in open_calls.iterator(chunk_size=500):
        requested = call.arguments if call.requested_arguments is None else call.requested_arguments
        canonical = canonical_json(requested).encode()
        call.arguments_digest = _digest(call.server_name, call.tool_name, canonical)
        call.save(update_fields=["arguments_digest"])


def encrypt_call_texts(apps, schema_editor):
    ToolCall = apps.get_model("approvals", "ToolCall")
    rows = ToolCall.objects.order_by("pk").only("pk", "error_message", "declined_requests")
    batch = []
    for call in rows.iterator(chunk_size=BATCH):
        if not (call.error_message or call.declined_requests):
            continue
        call.error_message = encrypt(call.error_message) if call.error_message else ""
        call.declined_requests_encrypted = call.declined_requests or []
        batch.append(call)
        if len(batch) >= BATCH:
            ToolCall.objects.bulk_update(batch, ["error_message", "declined_requests_encrypted"])
            batch = []
    if batch:
        ToolCall.objects.bulk_update(batch, ["error_message", "declined_requests_encrypted"])


def decrypt_call_texts(apps, schema_editor):
    ToolCall = apps.get_model("approvals", "ToolCall")
    rows = ToolCall.objects.order_by("pk").only(
        "pk", "error_message", "declined_requests_encrypted"
    )
    batch = []
    for call in rows.iterator(chunk_size=BATCH):
        call.error_message = decrypt(call.error_message) if call.error_message else ""
        call.declined_requests = call.declined_requests_encrypted or []
        batch.append(call)
        if len(batch) >= BATCH:
            ToolCall.objects.bulk_update(batch, ["error_message", "declined_requests"])
            batch = []
    if batch:
        ToolCall.objects.bulk_update(batch, ["error_message", "declined_requests"])


class Migration(migrations.Migration):
    dependencies = [
        ("approvals", "0010_encrypt_warnings"),
    ]

    operations = [
        migrations.AddField(
            model_name="toolcall",
            name="arguments_digest",
            field=models.CharField(blank=True, editable=False, max_length=64),
        ),
        migrations.AddField(
            model_name="toolcall",
            name="handed_back_at",
            field=models.DateTimeField(
                blank=True,
                editable=False,
                help_text="When an MCP client was last told the call is still pending: its "
                "repeat of the call may then re-attach once, even after the call finished.",
                null=True,
            ),
        ),
        migrations.AddIndex(
            model_name="toolcall",
            index=models.Index(
                fields=["agent", "arguments_digest", "finished_at"],
                name="approvals_t_agent_i_5043d6_idx",
            ),
        ),
        migrations.RunPython(digest_open_calls, migrations.RunPython.noop, elidable=False),
        migrations.AddField(
            model_name="toolcall",
            name="declined_requests_encrypted",
            field=integrations.fields.EncryptedJSONField(
                blank=True,
                default=list,
                help_text="Requests the server made during the call (sampling, elicitation) "
                "that Toolgate declined.",
            ),
        ),
        migrations.RunPython(encrypt_call_texts, decrypt_call_texts, elidable=False),
        migrations.RemoveField(model_name="toolcall", name="declined_requests"),
        migrations.RenameField(
            model_name="toolcall",
            old_name="declined_requests_encrypted",
            new_name="declined_requests",
        ),
        migrations.AlterField(
            model_name="toolcall",
            name="error_message",
            field=integrations.fields.EncryptedTextField(blank=True),
        ),
    ]
