"""Arguments and results encrypted at rest (issue 9 item 11), and each call's arguments size.

(`requested_arguments`, added by 0006, is encrypted from the start.)

The old JSON columns are copied into new encrypted ones row by row (each value encrypted as it
is saved), then dropped, and the new ones take their names: the same steps on SQLite and on
PostgreSQL, whose jsonb columns can't simply change type to encrypted text.
"""

import json

from django.db import migrations, models

import integrations.fields

BATCH = 500
COPIED = {
    "arguments": "arguments_encrypted",
    "result_content": "result_content_encrypted",
    "structured_content": "structured_content_encrypted",
}


def encrypt_existing(apps, schema_editor):
    ToolCall = apps.get_model("approvals", "ToolCall")
    rows = ToolCall.objects.order_by("pk").only("pk", *COPIED)
    batch = []
    for call in rows.iterator(chunk_size=BATCH):
        for old, new in COPIED.items():
            setattr(call, new, getattr(call, old))
        call.arguments_size = len(
            json.dumps(
                call.arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False
            ).encode()
        )
        batch.append(call)
        if len(batch) >= BATCH:
            ToolCall.objects.bulk_update(batch, [*COPIED.values(), "arguments_size"])
            batch = []
    if batch:
        ToolCall.objects.bulk_update(batch, [*COPIED.values(), "arguments_size"])


def decrypt_back(apps, schema_editor):
    ToolCall = apps.get_model("approvals", "ToolCall")
    rows = ToolCall.objects.order_by("pk").only("pk", *COPIED.values())
    batch = []
    for call in rows.iterator(chunk_size=BATCH):
        for old, new in COPIED.items():
            setattr(call, old, getattr(call, new))
        batch.append(call)
        if len(batch) >= BATCH:
            ToolCall.objects.bulk_update(batch, list(COPIED))
            batch = []
    if batch:
        ToolCall.objects.bulk_update(batch, list(COPIED))


class Migration(migrations.Migration):
    dependencies = [
        ("approvals", "0008_anomalies_and_metric_totals"),
    ]

    operations = [
        migrations.AddField(
            model_name="toolcall",
            name="arguments_size",
            field=models.PositiveIntegerField(
                default=0, help_text="Bytes of the arguments' canonical JSON, as requested."
            ),
        ),
        migrations.AddField(
            model_name="toolcall",
            name="arguments_encrypted",
            field=integrations.fields.EncryptedJSONField(
                default=dict, help_text="The arguments the call runs with."
            ),
        ),
        migrations.AddField(
            model_name="toolcall",
            name="result_content_encrypted",
            field=integrations.fields.EncryptedJSONField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="toolcall",
            name="structured_content_encrypted",
            field=integrations.fields.EncryptedJSONField(blank=True, null=True),
        ),
        migrations.RunPython(encrypt_existing, decrypt_back, elidable=False),
        migrations.RemoveField(model_name="toolcall", name="arguments"),
        migrations.RemoveField(model_name="toolcall", name="result_content"),
        migrations.RemoveField(model_name="toolcall", name="structured_content"),
        migrations.RenameField(
            model_name="toolcall", old_name="arguments_encrypted", new_name="arguments"
        ),
        migrations.RenameField(
            model_name="toolcall", old_name="result_content_encrypted", new_name="result_content"
        ),
        migrations.RenameField(
            model_name="toolcall",
            old_name="structured_content_encrypted",
            new_name="structured_content",
        ),
    ]
