"""An MCP client's repeat of a call re-attaches by a keyed digest of the requested arguments
(`ToolCall.twin_to_reattach`), not by decrypting every candidate's arguments.

Only calls that can still be re-attached to get a digest here: those that waited for a human
and are not finished (a finished call is re-attachable only after a hand-back, which no call
has yet). Their requested arguments are those an approver's edit replaced, if any.
"""

from django.db import migrations, models

from approvals.models import _digest
from integrations.limits import canonical_json


def digest_open_calls(apps, schema_editor):
    ToolCall = apps.get_model("approvals", "ToolCall")
    open_calls = ToolCall.objects.filter(finished_at__isnull=True, expires_at__isnull=False)
    for call in open_calls.iterator(chunk_size=500):
        requested = call.arguments if call.requested_arguments is None else call.requested_arguments
        canonical = canonical_json(requested).encode()
        call.arguments_digest = _digest(call.server_name, call.tool_name, canonical)
        call.save(update_fields=["arguments_digest"])


class Migration(migrations.Migration):
    dependencies = [
        ("approvals", "0009_encrypt_arguments_and_results"),
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
    ]
