from django.core.management.base import BaseCommand, CommandError

from integrations.models import Tool, ToolApproval


class Command(BaseCommand):
    help = "Change a tool's settings."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        approval = sub.add_parser("approval", help="Set a tool's Fine-Grained approval setting.")
        approval.add_argument("server")
        approval.add_argument("tool")
        approval.add_argument("setting", choices=ToolApproval.values)

    def handle(self, *args, action, server, tool, setting, **options):
        updated = Tool.objects.filter(server__name=server, name=tool).update(approval=setting)
        if not updated:
            raise CommandError(f"No tool {tool!r} on an MCP server named {server!r}.")
        self.stdout.write(f"{server} / {tool}: {ToolApproval(setting).label}.")
