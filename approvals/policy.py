"""THE policy: what runs, what waits for a human, what never runs, and why.

`decide(agent, tool, arguments)` is the one decision. It is asked at request time
(`request_tool_call`), at approval time (`ToolCall.approve`), just before the worker runs a
call (`ToolCall.run`), for the tool lists of the JSON API and the MCP endpoint
(`tools_for_agent`), for the queue card's "approve and always allow" and for the admin's
labels. Nothing else decides. In order (docs/architecture.md has the same list, with the
reason codes):

1. The agent is inactive or no longer allowed on the server, the server is disabled, the tool
   is unknown or removed -> refuse. (At request time a server the agent may not use is
   answered exactly like one that doesn't exist: `find_tool`.)
2. The tool is disabled, its definition changed after the call was requested (approval and run
   time), or a deny rule matches -> refuse.
3. The tool is not reviewed in its current definition: new since the first sync, changed since
   review, or flagged by the scanner -> ask, in every mode.
4. Personal data in the arguments, where the server asks for a human for it -> ask.
5. The approval mode: Always Ask -> ask; No Approval -> run; Fine-Grained -> the tool's
   setting. Rules act here: an ask rule (or a rule whose condition fails to evaluate) makes it
   ask; an allow rule makes an ask of this step run. Nothing loosens steps 1-4.
6. Arguments that fail the tool's input schema -> refuse (422), before anything is pending.
7. A run or an ask whose server needs reconnecting (its OAuth grant was refused) -> refuse
   (503, `needs_reconnect`), remembering what it would be once reconnected (`after_reconnect`):
   tool lists still show such tools, marked `unavailable`, and pending calls stay pending (an
   approval is refused with the reason) instead of being cancelled; an admin's reconnect is
   all it takes.

Precedence between rules follows: deny beats ask beats allow. Every outcome carries its
reasons, `{code, message}`, stored on the call and shown to the agent, the approver and the
audit; the codes are `Code` below and never change meaning.
"""

from dataclasses import dataclass, field

from django.db import models
from django.db.models import Prefetch, prefetch_related_objects
from django.utils import timezone

from approvals import conditions
from approvals.rules import PolicyRule, RuleAction
from integrations import statements
from integrations.models import Agent, ApprovalMode, McpServer, Tool, ToolApproval


class Outcome(models.TextChoices):
    RUN = "run", "Runs without asking"
    ASK = "ask", "Waits for a human"
    REFUSE = "refuse", "Never runs"


class Code(models.TextChoices):
    """Every reason the policy gives, by the outcome it leads to. Codes are an interface
    (agents, the dashboard, notifications read them): add new ones, never rename."""

    # refuse
    UNKNOWN_SERVER = "unknown_server", "The agent has no MCP server of that name"
    SERVER_DISABLED = "server_disabled", "The MCP server is disabled"
    UNKNOWN_TOOL = "unknown_tool", "The server has no tool of that name"
    AGENT_INACTIVE = "agent_inactive", "The agent has been deactivated"
    AGENT_NOT_ALLOWED = "agent_not_allowed", "The agent may no longer use the server"
    TOOL_REMOVED = "tool_removed", "The server no longer offers the tool"
    TOOL_DISABLED = "tool_disabled", "The tool is disabled"
    TOOL_CHANGED = "tool_changed", "The tool changed after the call was requested"
    RULE_DENIED = "rule_denied", "A deny rule matches"
    INVALID_ARGUMENTS = "invalid_arguments", "The arguments fail the tool's input schema"
    VALIDATION_TIMEOUT = "validation_timeout", "Checking the arguments took too long"
    NEEDS_RECONNECT = "needs_reconnect", "The MCP server needs reconnecting"
    # ask
    NOT_REVIEWED = "not_reviewed", "New tool, not yet reviewed"
    CHANGED_SINCE_REVIEW = "changed_since_review", "Changed since review"
    FLAGGED = "flagged", "Flagged by the scanner"
    PERSONAL_DATA = "personal_data", "Personal data in the arguments"
    ALWAYS_ASK = "always_ask", "Always Ask mode"
    REQUIRES_APPROVAL = "requires_approval", "Fine-Grained, and the tool requires approval"
    RULE_ASK = "rule_ask", "An ask rule matches"
    RULE_ERROR = "rule_error", "A rule's condition could not be evaluated"
    # run
    NO_APPROVAL = "no_approval", "No Approval mode"
    AUTO_APPROVED = "auto_approved", "Fine-Grained, and the tool is auto-approved"
    RULE_ALLOW = "rule_allow", "An allow rule matches"


# The HTTP status an agent's refused request is answered with (403 for the other refusals).
HTTP_STATUS = {
    Code.UNKNOWN_SERVER: 404,
    Code.UNKNOWN_TOOL: 404,
    Code.INVALID_ARGUMENTS: 422,
    Code.VALIDATION_TIMEOUT: 422,
    Code.NEEDS_RECONNECT: 503,  # Toolgate's side, until an admin reconnects; not the agent's
}


@dataclass(frozen=True)
class Reason:
    code: str
    message: str

    def as_json(self):
        return {"code": str(self.code), "message": self.message}


@dataclass(frozen=True)
class Decision:
    outcome: str
    reasons: tuple[Reason, ...]
    details: tuple[str, ...] = field(default=())  # the schema's messages, for invalid_arguments
    after_reconnect: str = ""  # for needs_reconnect: the outcome once the server is reconnected

    @property
    def code(self):
        return self.reasons[0].code

    @property
    def message(self):
        return self.reasons[0].message

    @property
    def status(self):
        """The HTTP status of a refusal."""
        return HTTP_STATUS.get(self.code, 403)

    def reasons_json(self):
        return [reason.as_json() for reason in self.reasons]


def _refuse(code, message, details=()):
    return Decision(Outcome.REFUSE, (Reason(code, message),), tuple(details))


# The decision ---------------------------------------------------------------------------------


def decide(
    agent, tool, arguments=None, *, fingerprint=None, requested_at=None, validate=True, rules=None,
    assigned=False,
):  # fmt: skip
    """Run, ask or refuse a call of `agent` to `tool` with `arguments`, and why.

    `arguments=None` decides for the tool itself (tool lists, admin labels): personal data and
    rules whose conditions need the arguments are then left out. `agent=None` decides for any
    agent allowed on the server. For an existing call pass its `fingerprint` (the tool's
    definition when requested; a different one now refuses) and `requested_at` (the `now` of
    rule conditions). `validate=False` skips the schema (arguments already checked against
    this very definition). `rules` are the rules to apply (default: the active ones in scope).
    `assigned`: the agent is known to have the tool's server (`find_tool` found the tool
    through the agent's servers, moments ago), so its servers are not read again.
    """
    decision = _decide(agent, tool, arguments, fingerprint, requested_at, validate, rules, assigned)
    if decision.outcome == Outcome.REFUSE or not tool.server.reconnect_reason:
        return decision
    return Decision(
        Outcome.REFUSE,
        (reconnect_reason(tool.server), *decision.reasons),
        after_reconnect=decision.outcome,
    )


def reconnect_reason(server):
    message = (
        f"The MCP server {server.name!r} needs reconnecting by an admin before its tools can "
        f"run: {server.reconnect_reason}"
    )
    return Reason(Code.NEEDS_RECONNECT, message)


def _decide(agent, tool, arguments, fingerprint, requested_at, validate, rules, assigned):
    refusal = _refusal(agent, tool, fingerprint, assigned)
    if refusal:
        return Decision(Outcome.REFUSE, (refusal,))
    rules = applicable_rules(agent, tool) if rules is None else rules
    verdicts = _verdicts(rules, _variables(agent, tool, arguments, requested_at), arguments)
    denied = tuple(reason for action, reason in verdicts if action == RuleAction.DENY)
    if denied:
        return Decision(Outcome.REFUSE, denied)
    if validate and arguments is not None:
        invalid = _schema_refusal(tool, arguments)
        if invalid:
            return invalid
    asks = [*review_reasons(tool), *_personal_data_reasons(tool, arguments)]
    asks += [reason for action, reason in verdicts if action == RuleAction.ASK]
    outcome, mode_reason = _mode(tool)
    allowed = [reason for action, reason in verdicts if action == RuleAction.ALLOW]
    if outcome == Outcome.ASK and allowed:
        outcome, mode_reason = Outcome.RUN, allowed[0]  # an allow rule loosens step 5 only
    if asks:
        return Decision(Outcome.ASK, (*asks, *([mode_reason] if outcome == Outcome.ASK else [])))
    return Decision(outcome, (mode_reason,))


def _refusal(agent, tool, fingerprint, assigned=False):
    if tool is None:
        return Reason(Code.TOOL_REMOVED, "The tool is no longer offered by the server.")
    refusal = agent_refusal(agent, tool.server, assigned)
    if refusal:
        return refusal
    if tool.removed:
        return Reason(Code.TOOL_REMOVED, f"The server no longer offers the tool {tool.name!r}.")
    if tool.approval == ToolApproval.DISABLED:
        return Reason(Code.TOOL_DISABLED, f"The tool {tool.name!r} is disabled.")
    if fingerprint is not None and fingerprint != tool.fingerprint:
        return Reason(
            Code.TOOL_CHANGED,
            "The tool's definition changed after this call was requested; it was not run.",
        )
    return None


def agent_refusal(agent, server, assigned=False):
    """Why `agent` may not call tools of `server` now, or None. (`agent=None`: any agent;
    `assigned`: the agent is known to have the server.)"""
    if agent is not None and not agent.is_active:
        return Reason(Code.AGENT_INACTIVE, f"The agent {agent.name!r} has been deactivated.")
    if agent is not None and not assigned and server.pk not in {s.pk for s in agent.servers.all()}:
        return Reason(
            Code.AGENT_NOT_ALLOWED,
            f"The agent {agent.name!r} may no longer use the MCP server {server.name!r}.",
        )
    if not server.enabled:
        return Reason(Code.SERVER_DISABLED, f"The MCP server {server.name!r} is disabled.")
    return None


def _variables(agent, tool, arguments, requested_at):
    variables = {
        "agent": agent.name if agent else "",
        "server": tool.server.name,
        "tool": tool.name,
        "now": requested_at or timezone.now(),
    }
    if arguments is not None:
        variables["args"] = arguments
    return variables


def _verdicts(rules, variables, arguments):
    """(action, reason) for every rule that matches; a condition that fails to evaluate asks
    (never allows, never denies). Without arguments, such a rule is left out instead."""
    verdicts = []
    for rule in rules:
        try:
            if rule.matches(variables):
                verdicts.append((rule.action, _rule_reason(rule)))
        except conditions.ConditionError as exc:
            if arguments is not None:
                message = f"The condition of {rule.label} could not be evaluated ({exc.message})."
                verdicts.append((RuleAction.ASK, Reason(Code.RULE_ERROR, message)))
    return verdicts


def _rule_reason(rule):
    if rule.action == RuleAction.DENY:
        return Reason(Code.RULE_DENIED, f"Denied by {rule.label}.")
    if rule.action == RuleAction.ASK:
        return Reason(Code.RULE_ASK, f"Needs a human by {rule.label}.")
    return Reason(Code.RULE_ALLOW, f"Allowed without asking by {rule.label}.")


def _schema_refusal(tool, arguments):
    from approvals.validation import InvalidArguments, validate_arguments

    try:
        validate_arguments(arguments, tool.input_schema)
    except InvalidArguments as exc:
        return schema_refusal(exc)
    return None


def schema_refusal(exc):
    """The refusal for arguments that failed the schema check (`InvalidArguments`), or whose
    check took longer than its deadline (`ValidationTimeout`)."""
    if exc.code == Code.VALIDATION_TIMEOUT:
        message = "Checking the arguments against the tool's input schema took too long."
        return _refuse(Code.VALIDATION_TIMEOUT, message, exc.messages)
    message = "The arguments do not match the tool's input schema."
    return _refuse(Code.INVALID_ARGUMENTS, message, exc.messages)


def review_reasons(tool):
    reasons = []
    if not tool.ever_reviewed:
        reasons.append(Reason(Code.NOT_REVIEWED, "New tool, not yet reviewed."))
    elif tool.changed_since_review:
        reasons.append(
            Reason(Code.CHANGED_SINCE_REVIEW, "Changed since review: its definition differs.")
        )
    if tool.flagged:
        first = tool.warnings[0]
        more = f" (and {len(tool.warnings) - 1} more)" if len(tool.warnings) > 1 else ""
        text = first.get("message") or first.get("code") or "a warning"
        reasons.append(Reason(Code.FLAGGED, f"Flagged by the scanner: {text}{more}"))
    return reasons


def _personal_data_reasons(tool, arguments):
    from approvals.pii import find_personal_data

    if arguments is None or not tool.server.personal_data_needs_approval:
        return []
    findings = find_personal_data(arguments)
    if not findings:
        return []
    places = ", ".join(f"{f['path']} ({f['label'].lower()})" for f in findings[:5])
    more = f" and {len(findings) - 5} more" if len(findings) > 5 else ""
    return [Reason(Code.PERSONAL_DATA, f"Personal data in {places}{more}.")]


def _mode(tool):
    mode = tool.server.approval_mode
    if mode == ApprovalMode.NO_APPROVAL:
        return Outcome.RUN, Reason(Code.NO_APPROVAL, "The server's mode is No Approval.")
    if mode == ApprovalMode.FINE_GRAINED and tool.approval == ToolApproval.AUTO_APPROVED:
        return Outcome.RUN, Reason(
            Code.AUTO_APPROVED, "Fine-Grained mode, and the tool is auto-approved."
        )
    if mode == ApprovalMode.FINE_GRAINED:
        return Outcome.ASK, Reason(
            Code.REQUIRES_APPROVAL, "Fine-Grained mode, and the tool requires approval."
        )
    return Outcome.ASK, Reason(Code.ALWAYS_ASK, "The server's mode is Always Ask.")


# Rules in scope -------------------------------------------------------------------------------


def with_active_rules(tools):
    """`tools` (a Tool queryset) with each server's active rules loaded in one query, for
    `applicable_rules` to read instead of querying per tool."""
    active = Prefetch(
        "server__policy_rules", queryset=PolicyRule.objects.active(), to_attr="active_rules"
    )
    return tools.select_related("server__oauth").prefetch_related(active)


def applicable_rules(agent, tool):
    """The active rules whose scope covers calls of `agent` to `tool`."""
    rules = getattr(tool.server, "active_rules", None)
    if rules is None:
        rules = PolicyRule.objects.active().filter(server_id=tool.server_id)
    return [rule for rule in rules if rule.applies_to(agent, tool)]


# Looking up what an agent names ---------------------------------------------------------------


def find_tool(agent, server_name, tool_name):
    """(server, tool, refusal) for a request naming a server and a tool; refusal is a Decision
    or None. A server the agent may not use gets the very answer of one that doesn't exist,
    with the same queries, so an agent can't learn which server names exist.

    A tool found is found through the agent's servers, with its server, in one query, which
    also says whether the server has active rules: without any, `applicable_rules` is
    answered without a query (the server's `active_rules` is set to none)."""
    found = _TOOL_OF_AGENT.rows(
        agent=agent.pk, server=server_name, tool=tool_name, now=timezone.now()
    )
    tool = found[0] if found else None
    if tool is not None:
        if not tool.server_has_rules:
            tool.server.active_rules = []
        return tool.server, tool, None
    server = agent.servers.select_related("oauth").filter(name=server_name).first()
    if server is None:
        message = f"This agent has no MCP server named {server_name!r}."
        return None, None, _refuse(Code.UNKNOWN_SERVER, message)
    refusal = agent_refusal(agent, server)
    if refusal:
        return server, None, Decision(Outcome.REFUSE, (refusal,))
    message = f"{server_name!r} has no tool named {tool_name!r}."
    return server, None, _refuse(Code.UNKNOWN_TOOL, message)


def _tool_of_agent(filters):
    has_rules = PolicyRule.objects.active(filters.sentinel("now")).filter(
        server_id=models.OuterRef("server_id")
    )
    return (
        Tool.objects.listed()
        .filter(
            server__agents=filters.sentinel("agent"),
            server__name=filters.sentinel("server"),
            name=filters.sentinel("tool"),
        )
        .select_related("server__oauth")
        .annotate(server_has_rules=models.Exists(has_rules))
        .order_by()[:1]  # one row at most (a server's tool names are unique): no ORDER BY to build
    )


# find_tool's query, its SQL built once per connection (integrations/statements.py): the ORM
# spent ~0.9 ms of CPU building and compiling it at each request, SQLite 0.05 ms running it.
_TOOL_OF_AGENT = statements.Query(
    _tool_of_agent,
    agent=Agent._meta.pk,
    server=McpServer._meta.get_field("name"),
    tool=Tool._meta.get_field("name"),
    now=PolicyRule._meta.get_field("expires_at"),
)


# What agents are shown ------------------------------------------------------------------------


@dataclass(frozen=True)
class ServedTool:
    """A tool as an agent is shown it, by the JSON API (`GET /api/v1/tools`) and the MCP
    endpoint (`tools/list`) alike: always the *reviewed* definition. A tool changed or flagged
    since is shown as it was reviewed, `awaiting_review`, and asks a human when called."""

    tool: Tool
    approval: str  # "auto" (runs on its own) or "requires_approval" (waits for a human)
    awaiting_review: bool
    unavailable: Reason | None  # why no call can run now (step 7), or None
    title: str
    description: str
    input_schema: dict
    output_schema: dict | None
    annotations: dict

    @property
    def server_name(self):
        return self.tool.server.name

    @property
    def name(self):
        return self.tool.name

    @classmethod
    def of(cls, tool, decision):
        reviewed = Tool.fields_from_definition(tool.reviewed_definition or {})
        outcome = decision.after_reconnect or decision.outcome
        return cls(
            tool=tool,
            approval="auto" if outcome == Outcome.RUN else "requires_approval",
            awaiting_review=tool.needs_review,
            unavailable=decision.reasons[0] if decision.after_reconnect else None,
            title=reviewed["title"],
            description=reviewed["description"],
            input_schema=reviewed["input_schema"],
            output_schema=reviewed["output_schema"],
            annotations=reviewed["annotations"],
        )

    def as_json(self):
        return {
            "server": self.server_name,
            "name": self.name,
            "title": self.title,
            "description": self.description,
            "input_schema": self.input_schema,
            "output_schema": self.output_schema,
            "annotations": self.annotations,
            "approval": self.approval,
            "awaiting_review": self.awaiting_review,
            "unavailable": self.unavailable.as_json() if self.unavailable else None,
        }


def tools_for_agent(agent, server_name=None, tool_name=None):
    """The tools `agent` may call, ordered by server and name, as reviewed. Left out: tools
    the policy refuses (disabled, denied by a rule) and tools no human has reviewed yet (they
    have no reviewed text to show; calling one by name still asks a human). Kept, marked
    `unavailable`: tools of a server that needs reconnecting (step 7). With `server_name` and
    `tool_name`, only that one tool, if it is listed (each tool's decision is its own)."""
    prefetch_related_objects([agent], "servers")
    tools = Tool.objects.listed().filter(server__agents=agent, server__enabled=True)
    if server_name is not None:
        tools = tools.filter(server__name=server_name, name=tool_name)
    tools = with_active_rules(
        tools.exclude(reviewed_fingerprint="").order_by("server__name", "name")
    )
    served = []
    for tool in tools:
        decision = decide(agent, tool, rules=applicable_rules(agent, tool))
        if decision.outcome != Outcome.REFUSE or decision.after_reconnect:
            served.append(ServedTool.of(tool, decision))
    return served


# "Approve and always allow" -------------------------------------------------------------------


def always_allow_changes_outcome(call, rules=None):
    """Whether an allow rule for the call's tool and agent would make the same request, made
    now, run instead of waiting: only then is "approve and always allow" worth offering."""
    tool, agent = call.tool, call.agent
    if tool is None or call.server_id is None:
        return False
    rules = applicable_rules(agent, tool) if rules is None else rules
    candidate = PolicyRule(
        server_id=tool.server_id, tool=tool, agent=agent, action=RuleAction.ALLOW
    )
    before = decide(agent, tool, call.arguments, validate=False, rules=rules)
    after = decide(agent, tool, call.arguments, validate=False, rules=[*rules, candidate])
    return before.outcome == Outcome.ASK and after.outcome == Outcome.RUN
