from django.core.management.base import BaseCommand, CommandError

from integrations.audit import command_user
from integrations.models import Tool, ToolApproval


class Command(BaseCommand):
    help = "Change a tool's settings and review it. Every change goes to the admin log."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        approval = sub.add_parser("approval", help="Set a tool's Fine-Grained approval setting.")
        review = sub.add_parser(
            "review", help="Mark a tool reviewed, accepting (and printing) what changed."
        )
        for command in (approval, review):
            command.add_argument("server")
            command.add_argument("tool")
            command.add_argument("--user", help="Whom the admin log names (default: manage.py).")
        approval.add_argument("setting", choices=ToolApproval.values)

    def handle(self, *args, action, server, tool, user, **options):
        found = Tool.objects.select_related("server").filter(server__name=server, name=tool).first()
        if found is None:
            raise CommandError(f"No tool {tool!r} on an MCP server named {server!r}.")
        getattr(self, f"handle_{action}")(found, command_user(user), **options)

    def handle_approval(self, tool, user, setting, **options):
        tool.set_approval(user, setting)
        self.stdout.write(f"{tool.server.name} / {tool.name}: {ToolApproval(setting).label}.")
        if tool.needs_review:
            self.stderr.write(
                f"Warning: {tool.name} still needs review, so its calls wait for a human in "
                f"every mode. Review it: manage.py mcp_tool review {tool.server.name} {tool.name}"
            )

    def handle_review(self, tool, user, **options):
        if tool.removed:
            raise CommandError(f"{tool.name} is no longer offered by {tool.server.name}.")
        if not tool.needs_review:
            self.stdout.write(f"{tool.server.name} / {tool.name} is already reviewed.")
            return
        diff = tool.mark_reviewed(user)
        self.stdout.write(diff or "(the definition is unchanged; its scanner warnings accepted)")
        for warning in tool.warnings:
            self.stdout.write(f"Scanner warning accepted: {warning.get('message', warning)}")
        self.stdout.write(f"{tool.server.name} / {tool.name}: marked reviewed.")
