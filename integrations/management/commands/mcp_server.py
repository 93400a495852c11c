import os

from django.core.management.base import BaseCommand, CommandError
from django.db.models import Count, Q

from integrations.audit import ADDITION, command_user, describe_form, log_change
from integrations.forms import McpServerForm, describe_errors
from integrations.models import ApprovalMode, McpServer, Transport


class Command(BaseCommand):
    help = "Add, sync and list MCP servers."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        add = sub.add_parser("add", help="Register a server and sync its tools now.")
        add.add_argument("--name", required=True)
        add.add_argument("--url", required=True)
        add.add_argument("--description", default="")
        add.add_argument("--transport", choices=Transport.values, default=Transport.AUTO)
        add.add_argument(
            "--token-env",
            metavar="VAR",
            help="Name of an environment variable holding the secret token "
            "(so the token stays out of the shell history and process list).",
        )
        add.add_argument(
            "--header", action="append", default=[], metavar='"Name: value"', dest="headers"
        )
        add.add_argument(
            "--approval-mode", choices=ApprovalMode.values, default=ApprovalMode.ALWAYS_ASK
        )
        add.add_argument(
            "--no-personal-data-approval",
            action="store_true",
            help="Let calls whose arguments look like personal data run without a human "
            "(on by default, as in the admin).",
        )
        add.add_argument("--allow-private-network", action="store_true")
        add.add_argument("--allow-http", action="store_true")
        add.add_argument("--user", help="Whom the admin log names (default: manage.py).")
        sync = sub.add_parser("sync", help="Sync servers now (all enabled ones by default).")
        sync.add_argument("names", nargs="*", metavar="NAME")
        sub.add_parser("list", help="List servers.")

    def handle(self, *args, action, **options):
        getattr(self, f"handle_{action}")(**options)

    def handle_add(self, **options):
        user = command_user(options["user"])
        token = ""
        if options["token_env"]:
            token = os.environ.get(options["token_env"], "")
            if not token:
                raise CommandError(f"The environment variable {options['token_env']} is empty.")
        form = McpServerForm(
            data={
                "name": options["name"],
                "description": options["description"],
                "url": options["url"],
                "transport": options["transport"],
                "secret_token": token,
                "headers_text": "\n".join(options["headers"]),
                "approval_mode": options["approval_mode"],
                "personal_data_needs_approval": not options["no_personal_data_approval"],
                "enabled": True,
                "allow_private_network": options["allow_private_network"],
                "allow_http": options["allow_http"],
            }
        )
        if not form.is_valid():
            raise CommandError("Server not added:\n  " + "\n  ".join(describe_errors(form)))
        server = form.save()
        log_change(user, server, describe_form(form, form.secret_fields, add=True), ADDITION)
        self.stdout.write(f"Added MCP server {server.name} ({server.origin}).")
        self._sync(server)
        for tool in server.tools.filter(removed_at__isnull=True):
            hints = ", ".join(tool.hints) or "-"
            self.stdout.write(f"  {tool.name:<40} {tool.get_approval_display():<18} {hints}")

    def handle_sync(self, names, **options):
        servers = (
            McpServer.objects.filter(name__in=names)
            if names
            else McpServer.objects.filter(enabled=True)
        )
        missing = set(names) - {server.name for server in servers}
        if missing:
            raise CommandError(f"No MCP server named {', '.join(sorted(missing))}.")
        failures = [server.name for server in servers if not self._sync(server)]
        if failures:
            raise CommandError(f"Sync failed for {', '.join(failures)}.")

    def handle_list(self, **options):
        servers = McpServer.objects.annotate(
            live_tools=Count("tools", filter=Q(tools__removed_at__isnull=True))
        )
        self.stdout.write(
            f"{'NAME':<30} {'TRANSPORT':<16} {'URL':<40} {'STATUS':<10} {'TOOLS':>5}  LAST SYNC"
        )
        for server in servers:
            status = "disabled" if not server.enabled else ("error" if server.last_error else "ok")
            if server.enabled and server.last_synced_at is None and not server.last_error:
                status = "never"
            synced = (
                server.last_synced_at.isoformat(timespec="seconds")
                if server.last_synced_at
                else "-"
            )
            self.stdout.write(
                f"{server.name:<30} {server.transport:<16} {server.origin:<40} "
                f"{status:<10} {server.live_tools:>5}  {synced}"
            )

    def _sync(self, server):
        result = server.sync_tools()
        if result.skipped:
            self.stdout.write(f"{server.name}: another sync is running; skipped.")
            return True
        if not result.ok:
            self.stderr.write(f"{server.name}: sync failed: {result.error}")
            return False
        self.stdout.write(f"{server.name}: synced, {result}.")
        return True
