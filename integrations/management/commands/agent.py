from django.core.management.base import BaseCommand, CommandError

from integrations.models import Agent, McpServer


class Command(BaseCommand):
    help = "Create agents. The token is printed alone on the last line, once."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        create = sub.add_parser("create", help="Create an agent and print its API token.")
        create.add_argument("name")
        create.add_argument("--server", action="append", default=[], dest="servers")
        create.add_argument("--description", default="")

    def handle(self, *args, action, name, servers, description, **options):
        if Agent.objects.filter(name=name).exists():
            raise CommandError(f"An agent named {name!r} already exists.")
        found = list(McpServer.objects.filter(name__in=servers))
        missing = set(servers) - {server.name for server in found}
        if missing:
            raise CommandError(f"No MCP server named {', '.join(sorted(missing))}.")
        _, token = Agent.create_with_token(name, found, description=description)
        self.stdout.write(f"Created agent {name} for {', '.join(servers) or 'no servers'}.")
        self.stdout.write(token)
