from django.core.management.base import BaseCommand, CommandError

from integrations.audit import ADDITION, command_user, log_change
from integrations.models import Agent, McpServer


class Command(BaseCommand):
    help = (
        "Create agents, grant and revoke their servers, deactivate them. A new agent's token "
        "is printed alone on the last line, once. Changes go to the admin log; taking a server "
        "from an agent, or deactivating it, cancels its pending calls."
    )

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        create = sub.add_parser("create", help="Create an agent and print its API token.")
        create.add_argument("--description", default="")
        grant = sub.add_parser("grant", help="Let an agent use more servers.")
        revoke = sub.add_parser("revoke", help="Take servers away from an agent.")
        deactivate = sub.add_parser("deactivate", help="Stop an agent (its token stops working).")
        for command in (create, grant, revoke, deactivate):
            command.add_argument("name")
            command.add_argument("--user", help="Whom the admin log names (default: manage.py).")
        for command in (create, grant, revoke):
            command.add_argument("--server", action="append", default=[], dest="servers")

    def handle(self, *args, action, name, user, **options):
        getattr(self, f"handle_{action}")(name, command_user(user), **options)

    def handle_create(self, name, user, servers, description, **options):
        if Agent.objects.filter(name=name).exists():
            raise CommandError(f"An agent named {name!r} already exists.")
        found = _servers(servers)
        agent, token = Agent.create_with_token(name, found, description=description)
        listed = ", ".join(servers) or "no servers"
        log_change(user, agent, f"Added with MCP servers: {listed}.", ADDITION)
        self.stdout.write(f"Created agent {name} for {listed}.")
        self.stdout.write(token)

    def handle_grant(self, name, user, servers, **options):
        agent, found = _agent(name), _servers(servers, required=True)
        agent.servers.add(*found)
        log_change(user, agent, f"Granted MCP servers: {', '.join(servers)}.")
        self.stdout.write(f"{name} may now use {', '.join(servers)}.")

    def handle_revoke(self, name, user, servers, **options):
        agent, found = _agent(name), _servers(servers, required=True)
        agent.servers.remove(*found)  # cancels its pending calls to them (approvals/signals.py)
        log_change(user, agent, f"Revoked MCP servers: {', '.join(servers)}.")
        self.stdout.write(f"{name} may no longer use {', '.join(servers)}.")

    def handle_deactivate(self, name, user, **options):
        agent = _agent(name)
        agent.is_active = False
        agent.save(update_fields=["is_active"])  # cancels its pending calls
        log_change(user, agent, "Changed active: on → off.")
        self.stdout.write(f"Deactivated agent {name}.")


def _agent(name):
    agent = Agent.objects.filter(name=name).first()
    if agent is None:
        raise CommandError(f"No agent named {name!r}.")
    return agent


def _servers(names, required=False):
    if required and not names:
        raise CommandError("Name at least one --server.")
    found = list(McpServer.objects.filter(name__in=names))
    missing = set(names) - {server.name for server in found}
    if missing:
        raise CommandError(f"No MCP server named {', '.join(sorted(missing))}.")
    return found
