import os
import time

from django.core.management.base import BaseCommand, CommandError
from django.db.models import Count, Q

from integrations import oauth, oauth_http
from integrations.audit import ADDITION, command_user, describe_form, log_change
from integrations.forms import McpServerForm, describe_errors
from integrations.models import ApprovalMode, AuthKind, McpServer, Transport
from integrations.oauth import AuthorizationStatus, Grant


class CommandServerForm(McpServerForm):
    """The admin's form, with errors naming this command's flags instead of the checkboxes."""

    OPTION_HINTS = {
        "allow_http": "add --allow-http",
        "allow_private_network": "add --allow-private-network",
    }


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
            "--auth", choices=AuthKind.values, help="Default: secret_token with --token-env."
        )
        add.add_argument("--client-id", default="", help="OAuth: a pre-registered client.")
        add.add_argument(
            "--client-secret-env", metavar="VAR", help="OAuth: variable holding its secret."
        )
        add.add_argument(
            "--scope", action="append", default=[], metavar="S", help="OAuth: a scope to ask for."
        )
        add.add_argument("--grant", choices=Grant.values, default=Grant.AUTHORIZATION_CODE)
        add.add_argument("--issuer", default="", help="OAuth: the only authorization server.")
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
        authorize = sub.add_parser(
            "authorize",
            help="Connect an OAuth server: prints `Open: <URL>` and waits for the browser.",
        )
        authorize.add_argument("name", metavar="NAME")
        authorize.add_argument(
            "--timeout", type=float, default=600.0, metavar="S", help="Seconds to wait (600)."
        )

    def handle(self, *args, action, **options):
        getattr(self, f"handle_{action}")(**options)

    def handle_add(self, **options):
        user = command_user(options["user"])
        token = _from_environment(options["token_env"])
        client_secret = _from_environment(options["client_secret_env"])
        form = CommandServerForm(
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
                "auth_kind": options["auth"] or "",
                "oauth_grant": options["grant"],
                "oauth_client_id": options["client_id"],
                "oauth_client_secret": client_secret,
                "oauth_scope": " ".join(options["scope"]),
                "oauth_issuer": options["issuer"],
            }
        )
        if not form.is_valid():
            raise CommandError("Server not added:\n  " + "\n  ".join(describe_errors(form)))
        server = form.save()
        log_change(user, server, describe_form(form, form.secret_fields, add=True), ADDITION)
        self.stdout.write(f"Added MCP server {server.name} ({server.origin}).")
        credential = oauth.credential_for(server)
        if credential is not None and credential.needs_sign_in:
            self.stdout.write(f"Connect it: manage.py mcp_server authorize {server.name}")
            return
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
        for server in servers.select_related("oauth"):
            status = "disabled" if not server.enabled else ("error" if server.last_error else "ok")
            if server.enabled and server.last_synced_at is None and not server.last_error:
                status = "never"
            credential = oauth.credential_for(server) if server.uses_oauth else None
            if credential is not None and (credential.needs_reconnect or credential.needs_sign_in):
                status = "reconnect" if credential.needs_reconnect else "connect"
            synced = (
                server.last_synced_at.isoformat(timespec="seconds")
                if server.last_synced_at
                else "-"
            )
            self.stdout.write(
                f"{server.name:<30} {server.transport:<16} {server.origin:<40} "
                f"{status:<10} {server.live_tools:>5}  {synced}"
            )

    def handle_authorize(self, name, timeout, **options):
        """Exactly one line on stdout, `Open: <URL>`, then wait for Toolgate's callback. The
        outcome goes to stderr; the exit status says whether the server got connected."""
        server = McpServer.objects.filter(name=name).first()
        credential = oauth.credential_for(server) if server else None
        if credential is None:
            raise CommandError(f"No MCP server named {name} uses OAuth 2.1.")
        if timeout <= 0:
            raise CommandError("--timeout must be a positive number of seconds.")
        try:
            if credential.grant == Grant.CLIENT_CREDENTIALS:
                credential.connect_client_credentials()
                server.request_sync()
                self.stderr.write(f"Connected {name} (client credentials).")
                return
            authorization = credential.start_sign_in(for_command=True, timeout=timeout)
        except oauth_http.OAuthProblem as problem:
            raise CommandError(f"Could not connect {name}: {problem}") from None
        self.stdout.write(f"Open: {authorization.url}")
        self.stdout.flush()
        self._wait_for_browser(authorization, timeout)

    def _wait_for_browser(self, authorization, timeout):
        try:
            finished = _wait_until_finished(authorization, timeout)
        finally:
            given_up = authorization.give_up(
                f"The command stopped waiting after {timeout:g} seconds."
            )
        if not finished and not given_up:  # the browser came back in time: let it finish
            _wait_until_finished(authorization, oauth.token_request_timeout() * 2)
        authorization.refresh_from_db()
        name = authorization.credential.server.name
        if authorization.status == AuthorizationStatus.SUCCEEDED:
            self.stderr.write(f"Connected {name}; its tools are being synced.")
            return
        if authorization.status in (AuthorizationStatus.EXPIRED, AuthorizationStatus.PENDING):
            raise CommandError(
                f"Timed out: the browser did not come back to Toolgate within {timeout:g} "
                "seconds. Run the command again for a new link."
            )
        raise CommandError(f"{name} was not connected: {authorization.error}")

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


def _from_environment(variable):
    """A secret read from an environment variable, so it stays out of shell history and the
    process list."""
    if not variable:
        return ""
    value = os.environ.get(variable, "")
    if not value:
        raise CommandError(f"The environment variable {variable} is empty.")
    return value


def _wait_until_finished(authorization, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        authorization.refresh_from_db()
        if authorization.status != AuthorizationStatus.PENDING:
            return True
        time.sleep(0.25)
    return False
