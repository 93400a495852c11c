from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.utils.dateparse import parse_datetime
from django.utils.timezone import is_naive, make_aware

from approvals.rules import PolicyRule, RuleAction
from integrations.audit import ADDITION, DELETION, command_user, log_change
from integrations.models import Agent, McpServer, Tool


class Command(BaseCommand):
    help = (
        "Add, list and remove policy rules: a CEL condition over a call (args, agent, server, "
        "tool, now) that allows, asks or denies. Changes go to the admin log."
    )

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        add = sub.add_parser("add", help="Add a rule (its condition is compiled first).")
        add.add_argument("--server", required=True)
        add.add_argument("--tool", help="Only this tool of the server (default: all of them).")
        add.add_argument("--agent", help="Only this agent (default: every agent).")
        add.add_argument("--when", required=True, metavar="EXPR", help='e.g. "args.amount <= 50"')
        add.add_argument("--action", required=True, choices=RuleAction.values, dest="rule_action")
        add.add_argument("--expires", metavar="ISO-8601", help="e.g. 2030-01-31T18:00:00Z")
        add.add_argument("--note", default="")
        sub.add_parser("list", help="List the rules, expired ones marked.")
        remove = sub.add_parser("remove", help="Remove a rule by its number.")
        remove.add_argument("id", type=int)
        for command in (add, remove):
            command.add_argument("--user", help="Whom the admin log names (default: manage.py).")

    def handle(self, *args, action, **options):
        getattr(self, f"handle_{action}")(**options)

    def handle_add(self, server, tool, agent, when, rule_action, expires, note, user, **options):
        user = command_user(user)
        rule = PolicyRule(
            server=_get(McpServer, "MCP server", name=server),
            tool=_get(Tool, f"tool on {server}", server__name=server, name=tool) if tool else None,
            agent=_get(Agent, "agent", name=agent) if agent else None,
            condition=when,
            action=rule_action,
            expires_at=_when(expires) if expires else None,
            note=note,
            created_by=user,
        )
        try:
            rule.full_clean()
        except ValidationError as exc:
            problems = [f"{k}: {m}" for k, ms in exc.message_dict.items() for m in ms]
            raise CommandError("Rule not added:\n  " + "\n  ".join(problems)) from None
        rule.save()
        log_change(user, rule, f"Added: {rule_action} when {when}.", ADDITION)
        self.stdout.write(f"Added rule #{rule.pk}: {rule_action} {rule.scope} when {when}")

    def handle_list(self, **options):
        rules = PolicyRule.objects.select_related("server", "tool", "agent")
        self.stdout.write(f"{'ID':>5}  {'ACTION':<6} {'SCOPE':<50} {'EXPIRES':<26} CONDITION")
        for rule in rules:
            expires = rule.expires_at.isoformat(timespec="seconds") if rule.expires_at else "-"
            if rule.expired:
                expires += " (expired)"
            self.stdout.write(
                f"{rule.pk:>5}  {rule.action:<6} {rule.scope:<50} {expires:<26} {rule.condition}"
            )

    def handle_remove(self, id, user, **options):
        rule = PolicyRule.objects.select_related("server", "tool", "agent").filter(pk=id).first()
        if rule is None:
            raise CommandError(f"No rule #{id}.")
        log_change(
            command_user(user), rule, f"Deleted: {rule.action} when {rule.condition}.", DELETION
        )
        rule.delete()
        self.stdout.write(f"Removed rule #{id}.")


def _get(model, what, **lookup):
    found = model.objects.filter(**lookup).first()
    if found is None:
        raise CommandError(f"No {what} named {list(lookup.values())[-1]!r}.")
    return found


def _when(text):
    moment = parse_datetime(text.replace("Z", "+00:00"))
    if moment is None:
        raise CommandError(f"--expires {text!r} is not an ISO-8601 date and time.")
    return make_aware(moment) if is_naive(moment) else moment
