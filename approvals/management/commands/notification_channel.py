import os

from django.core.management.base import BaseCommand, CommandError

from approvals.forms import NotificationChannelForm
from approvals.notifications import EVENTS, ChannelKind, DeliveryStatus, NotificationChannel
from integrations.forms import describe_errors
from integrations.models import Agent, McpServer


class Command(BaseCommand):
    help = "Add, list and test notification channels (e-mail, Slack, signed webhooks)."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        add = sub.add_parser("add", help="Add a channel.")
        add.add_argument("--kind", required=True, choices=ChannelKind.values)
        add.add_argument("--name", required=True)
        # nargs="+" with "extend": `--to a@x b@x` and `--to a@x --to b@x` both keep every value
        # (a plain nargs="+" keeps only the last --to).
        add.add_argument(
            "--to", nargs="+", action="extend", default=[], metavar="ADDRESS",
            help="E-mail channels: one or more addresses (repeatable).",
        )  # fmt: skip
        add.add_argument(
            "--url-env",
            metavar="VAR",
            help="Environment variable holding the Slack or webhook URL (a secret: it stays out "
            "of the shell history and the process list).",
        )
        add.add_argument(
            "--secret-env", metavar="VAR", help="Environment variable holding a webhook's secret."
        )
        add.add_argument(
            "--event", nargs="+", action="extend", default=[], choices=list(EVENTS),
            dest="events", metavar="EVENT",
            help=f"Events to send (repeatable; default: all). One of: {', '.join(EVENTS)}.",
        )  # fmt: skip
        add.add_argument(
            "--server", nargs="+", action="extend", default=[], dest="servers", metavar="S",
            help="Only calls and events about these servers (repeatable; default: all).",
        )  # fmt: skip
        add.add_argument(
            "--agent", nargs="+", action="extend", default=[], dest="agents", metavar="A",
            help="Only calls and events about these agents (repeatable; default: all).",
        )  # fmt: skip
        add.add_argument(
            "--include-arguments", action="store_true",
            help="Put the calls' argument values in messages (default: only which kinds of "
            "personal data were detected).",
        )  # fmt: skip
        add.add_argument("--allow-private-network", action="store_true")
        add.add_argument("--allow-http", action="store_true")
        sub.add_parser("list", help="List channels.")
        test = sub.add_parser("test", help="Send a test message now; exits non-zero if it fails.")
        test.add_argument("name", metavar="NAME")

    def handle(self, *args, action, **options):
        getattr(self, f"handle_{action}")(**options)

    def handle_add(self, **options):
        form = NotificationChannelForm(
            data={
                "name": options["name"],
                "kind": options["kind"],
                "recipients_text": ", ".join(options["to"]),
                "url": _from_env(options["url_env"]),
                "secret": _from_env(options["secret_env"]),
                "events": options["events"] or list(EVENTS),
                "servers": _pks(McpServer, "MCP server", options["servers"]),
                "agents": _pks(Agent, "agent", options["agents"]),
                "enabled": True,
                "include_arguments": options["include_arguments"],
                "allow_private_network": options["allow_private_network"],
                "allow_http": options["allow_http"],
            }
        )
        if not form.is_valid():
            raise CommandError("Channel not added:\n  " + "\n  ".join(describe_errors(form)))
        channel = form.save()
        self.stdout.write(f"Added {channel.get_kind_display()} channel {channel.name}.")

    def handle_list(self, **options):
        self.stdout.write(f"{'NAME':<30} {'KIND':<8} {'ENABLED':<8} {'TARGET':<40} EVENTS")
        for channel in NotificationChannel.objects.all():
            enabled = "yes" if channel.enabled else "no"
            self.stdout.write(
                f"{channel.name:<30} {channel.kind:<8} {enabled:<8} {channel.target:<40} "
                f"{','.join(channel.events)}"
            )

    def handle_test(self, name, **options):
        channel = NotificationChannel.objects.filter(name=name).first()
        if channel is None:
            raise CommandError(f"No notification channel named {name!r}.")
        delivery = channel.send_test()
        if delivery.status != DeliveryStatus.SENT:
            raise CommandError(f"{channel.name}: the test message failed: {delivery.last_error}")
        self.stdout.write(f"{channel.name}: test message sent.")


def _from_env(variable):
    if not variable:
        return ""
    value = os.environ.get(variable, "")
    if not value:
        raise CommandError(f"The environment variable {variable} is empty.")
    return value


def _pks(model, label, names):
    """The primary keys of the `model` rows named `names`; every name must exist."""
    found = dict(model.objects.filter(name__in=names).values_list("name", "pk"))
    missing = set(names) - set(found)
    if missing:
        raise CommandError(f"No {label} named {', '.join(sorted(missing))}.")
    return list(found.values())
