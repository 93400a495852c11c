"""A call's result warnings encrypted at rest like its result (a warning may quote it): the
same steps as 0009, copy into a new encrypted column, drop the old one, take its name."""

from django.db import migrations

import integrations.fields

BATCH = 500


def _copy(apps, source, target):
    ToolCall = apps.get_model("approvals", "ToolCall")
    batch = []
    for call in ToolCall.objects.order_by("pk").only("pk", source).iterator(chunk_size=BATCH):
        setattr(call, target, getattr(call, source) or [])
        batch.append(call)
        if len(batch) >= BATCH:
            ToolCall.objects.bulk_update(batch, [target])
            batch = []
    if batch:
        ToolCall.objects.bulk_update(batch, [target])


def encrypt_existing(apps, schema_editor):
    _copy(apps, "warnings", "warnings_encrypted")


def decrypt_back(apps, schema_editor):
    _copy(apps, "warnings_encrypted", "warnings")


class Migration(migrations.Migration):
    dependencies = [
        ("approvals", "0009_encrypt_arguments_and_results"),
    ]

    operations = [
        migrations.AddField(
            model_name="toolcall",
            name="warnings_encrypted",
            field=integrations.fields.EncryptedJSONField(
                blank=True,
                default=list,
                help_text="Result text that looks like instructions to the model.",
            ),
        ),
        migrations.RunPython(encrypt_existing, decrypt_back, elidable=False),
        migrations.RemoveField(model_name="toolcall", name="warnings"),
        migrations.RenameField(
            model_name="toolcall", old_name="warnings_encrypted", new_name="warnings"
        ),
    ]
