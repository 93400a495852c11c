"""Policy rules: an admin's (or an approver's "always allow") condition on the calls to a
server, optionally one tool and one agent, that allows, asks or denies. What a rule can and
can't change is decided in approvals/policy.py; this module holds the rule itself."""

from datetime import timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q
from django.utils import timezone

from approvals import conditions
from integrations.models import Agent, McpServer, Tool


class RuleAction(models.TextChoices):
    ALLOW = "allow", "Allow (run without asking)"
    ASK = "ask", "Ask a human"
    DENY = "deny", "Deny (never run)"


# "Approve and always allow": how long the rule it creates lasts.
ALWAYS_ALLOW_DURATIONS = {
    "hour": ("for an hour", timedelta(hours=1)),
    "day": ("for a day", timedelta(days=1)),
    "forever": ("until revoked", None),
}


class PolicyRuleQuerySet(models.QuerySet):
    def active(self, now=None):
        """Rules not expired at `now` (default: now). Expired rules are kept, and ignored."""
        now = now or timezone.now()
        return self.filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))


class PolicyRule(models.Model):
    server = models.ForeignKey(McpServer, on_delete=models.CASCADE, related_name="policy_rules")
    tool = models.ForeignKey(
        Tool,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="policy_rules",
        help_text="Leave empty for every tool of the server.",
    )
    agent = models.ForeignKey(
        Agent,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="policy_rules",
        help_text="Leave empty for every agent.",
    )
    condition = models.TextField(
        default="true",
        help_text="A CEL expression over args, agent, server, tool and now, e.g. "
        'args.amount <= 50 && args.currency == "EUR". `true` matches every call.',
    )
    action = models.CharField(max_length=10, choices=RuleAction)
    expires_at = models.DateTimeField(
        null=True, blank=True, help_text="After this the rule is ignored (and shown as expired)."
    )
    note = models.CharField(max_length=500, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_from_call = models.ForeignKey(
        "approvals.ToolCall",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text='The call whose "approve and always allow" created this rule.',
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    objects = PolicyRuleQuerySet.as_manager()

    class Meta:
        ordering = ["server__name", "id"]
        verbose_name = "policy rule"
        indexes = [models.Index(fields=["server", "expires_at"])]

    def __str__(self):
        return f"Rule #{self.pk}: {self.action} {self.scope}" if self.pk else "New rule"

    @property
    def scope(self):
        tool = self.tool.name if self.tool_id else "every tool"
        agent = f"agent {self.agent.name}" if self.agent_id else "every agent"
        return f"{self.server.name} / {tool}, {agent}"

    @property
    def expired(self):
        return self.expires_at is not None and self.expires_at <= timezone.now()

    @property
    def label(self):
        """How a person names the rule in a reason: its number and note, or its condition."""
        about = self.note or self.condition
        about = about if len(about) <= 120 else about[:119] + "…"
        return f"rule #{self.pk} “{about}”" if self.pk else f"a new rule “{about}”"

    def applies_to(self, agent, tool):
        """Whether the rule's scope (not its condition) covers calls of `agent` to `tool`."""
        return (
            self.server_id == tool.server_id
            and self.tool_id in (None, tool.pk)
            and (self.agent_id is None or (agent is not None and self.agent_id == agent.pk))
        )

    def clean(self):
        try:
            conditions.compile_condition(self.condition)
        except conditions.ConditionError as exc:
            raise ValidationError({"condition": exc.message}) from None
        if self.tool_id and self.server_id and self.tool.server_id != self.server_id:
            raise ValidationError({"tool": "This tool belongs to another MCP server."})

    def matches(self, variables):
        """True or False; ConditionError when the condition can't be evaluated."""
        return conditions.evaluate(self.condition, variables)

    @classmethod
    def always_allow(cls, call, user, agent="this", arguments="any", duration="forever"):
        """The allow rule an approver's "approve and always allow" makes from `call`: for its
        tool, for its agent or every agent, for any arguments or only the same ones, for an
        hour, a day or until revoked. Written to the admin log as the approver's."""
        from integrations.audit import ADDITION, log_change

        condition = "true" if arguments == "any" else same_arguments_condition(call.arguments)
        if condition is None or agent not in ("this", "every"):
            raise ValueError("This scope can't be made into a rule.")
        words, lasts = ALWAYS_ALLOW_DURATIONS[duration]
        rule = cls.objects.create(
            server_id=call.tool.server_id,
            tool=call.tool,
            agent=call.agent if agent == "this" else None,
            condition=condition,
            action=RuleAction.ALLOW,
            expires_at=timezone.now() + lasts if lasts else None,
            note=f"Always allow, from call #{call.pk}",
            created_by=user,
            created_from_call=call,
        )
        who = f"agent {call.agent.name}" if agent == "this" else "every agent"
        what = "any arguments" if arguments == "any" else "the same arguments"
        message = f"Added by approving call #{call.pk}: allow for {who}, {what}, {words}."
        log_change(user, rule, message, ADDITION)
        return rule


def same_arguments_condition(arguments):
    """`args == {…}` for exactly these arguments, or None where no such rule is offered: the
    arguments carry personal data (a rule's condition is stored and shown in clear), can't be
    written exactly in CEL, or are too long for a condition."""
    from approvals.pii import find_personal_data

    text = conditions.literal(arguments)
    if text is None or find_personal_data(arguments):
        return None
    condition = f"args == {text}"
    try:
        conditions.compile_condition(condition)
    except conditions.ConditionError:
        return None
    return condition
