from django.conf import settings
from django.core.management.base import BaseCommand

from approvals.models import ToolCall


class Command(BaseCommand):
    help = (
        "Remove the arguments and results of tool calls that finished more than "
        "TOOL_CALL_RETENTION_DAYS ago (the audit record of who, what, when and the outcome stays)."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--days", type=int, default=None, help="Override TOOL_CALL_RETENTION_DAYS."
        )

    def handle(self, *args, days, **options):
        days = settings.TOOL_CALL_RETENTION_DAYS if days is None else days
        purged = ToolCall.purge_old_data(days)
        self.stdout.write(f"Purged arguments and results of {purged} call(s) over {days} days old.")
