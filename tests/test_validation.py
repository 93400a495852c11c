"""Checking a call's arguments against the tool's schema: bounded whatever the server's schema
and the agent's arguments, and never stalling another agent's request (issue 9 item 2).

The end-to-end tests serve the real ASGI application (config/asgi.py, with its shared API
thread) with uvicorn on loopback, and time another agent's requests against the attack itself,
never against a fixed number of seconds.
"""

import threading
import time

import httpx2
import pytest
from django.utils import timezone

from approvals.models import Status, ToolCall
from approvals.validation import (
    InvalidArguments,
    OverBudget,
    ValidationTimeout,
    validate_arguments,
    within_budget,
)
from integrations.models import Agent, ApprovalMode, McpServer, Tool
from tests.mcp_servers import start


def fan_out(depth):
    """About 1 KB that jsonschema expands 2**depth times: allOf two refs to the next level."""
    defs = {f"d{i}": {"allOf": [{"$ref": f"#/$defs/d{i + 1}"}] * 2} for i in range(depth)}
    defs[f"d{depth}"] = {"type": "string"}
    return {"type": "object", "properties": {"q": {"$ref": "#/$defs/d0"}}, "$defs": defs}


CATASTROPHIC = {"type": "object", "properties": {"q": {"type": "string", "pattern": "^(a+)+$"}}}
UNIQUE = {"type": "object", "properties": {"q": {"type": "array", "uniqueItems": True}}}


def mixed_items(count):
    """Strings and numbers: jsonschema can't sort them, so it used to compare every pair."""
    return [str(i) if i % 2 else i for i in range(count)]


# The checks themselves ---------------------------------------------------------------------


def test_a_catastrophic_pattern_is_checked_by_a_linear_engine():
    with pytest.raises(InvalidArguments, match=r"does not match '\^\(a\+\)\+\$'"):
        validate_arguments({"q": "a" * 100_000 + "!"}, CATASTROPHIC, timeout=30)
    validate_arguments({"q": "a" * 100_000}, CATASTROPHIC, timeout=30)


def test_unique_items_of_mixed_types_are_checked_in_linear_time():
    validate_arguments({"q": mixed_items(40_000)}, UNIQUE, timeout=30)
    with pytest.raises(InvalidArguments, match="item 40000 repeats an earlier item"):
        validate_arguments({"q": [*mixed_items(40_000), 8]}, UNIQUE, timeout=30)


@pytest.mark.parametrize(
    "items, unique",
    [([1, 1.0], False), ([1, True], True), ([0, False], True), ([{"a": 1}, {"a": 1.0}], False),
     ([[1, "1"], [1, 1]], True), ([None, "null"], True), ([{"a": 1, "b": 2}, {"b": 2}], True)],
)  # fmt: skip
def test_unique_items_follow_json_schema_equality(items, unique):
    if unique:
        validate_arguments({"q": items}, UNIQUE)
    else:
        with pytest.raises(InvalidArguments, match="repeats an earlier item"):
            validate_arguments({"q": items}, UNIQUE)


def test_a_fan_out_of_references_stops_at_the_deadline():
    with pytest.raises(ValidationTimeout, match=r"took longer than 0\.3 s and was stopped"):
        validate_arguments({"q": "x"}, fan_out(30), timeout=0.3)
    validate_arguments({"q": "x"}, fan_out(4))  # a small fan-out is an ordinary schema


def test_pattern_properties_and_the_keywords_that_consult_them_run_on_re2():
    schema = {
        "type": "object",
        "$defs": {"named": {"patternProperties": {"^(a+)+$": {"type": "integer"}}}},
        "allOf": [{"$ref": "#/$defs/named"}],
        "unevaluatedProperties": False,
    }
    evil_key = "a" * 50_000 + "!"
    with pytest.raises(InvalidArguments, match="Unevaluated properties are not allowed"):
        validate_arguments({evil_key: 1}, schema, timeout=30)
    validate_arguments({"aaaa": 1}, schema)
    closed = {"patternProperties": {"^(a+)+$": {}}, "additionalProperties": False}
    with pytest.raises(InvalidArguments, match=r"do(es)? not match any of the regexes"):
        validate_arguments({evil_key: 1}, closed, timeout=30)
    with pytest.raises(InvalidArguments, match=r"arguments\.aaa: 'x' is not of type 'integer'"):
        validate_arguments({"aaa": "x"}, {"patternProperties": {"^a+$": {"type": "integer"}}})


def test_a_pattern_re2_cannot_run_is_not_checked():
    lookahead = {"properties": {"q": {"pattern": "^(?=.*x)"}}}
    validate_arguments({"q": "no match for python"}, lookahead)


def test_ordinary_schemas_still_report_every_problem():
    schema = {
        "type": "object",
        "properties": {"text": {"type": "string", "maxLength": 3}, "n": {"minimum": 1}},
        "required": ["text"],
        "additionalProperties": False,
    }
    with pytest.raises(InvalidArguments) as caught:
        validate_arguments({"text": "long", "n": 0, "x": 1}, schema)
    assert caught.value.messages == [
        "arguments: Additional properties are not allowed ('x' was unexpected)",
        "arguments.n: 0 is less than the minimum of 1",
        "arguments.text: 'long' is too long",
    ]


ECHO = {"type": "object", "properties": {"text": {"type": "string", "maxLength": 9}}}


def test_a_check_within_budget_answers_only_when_provably_cheap():
    """`within_budget` (the decision in the API's first hop, on the shared database thread)
    gives a real answer for small arguments against a small schema whose validator is built,
    and OverBudget (check it on the validation threads) for anything else."""
    with within_budget(), pytest.raises(OverBudget):  # its validator was never built
        validate_arguments({"text": "hi"}, {**ECHO, "title": "never built"})
    validate_arguments({"text": "hi"}, ECHO)  # built now, as on a validation thread
    with within_budget():
        validate_arguments({"text": "hi"}, ECHO)
        with pytest.raises(InvalidArguments, match="is too long"):
            validate_arguments({"text": "far too long"}, ECHO)
    big_arguments = {"text": "x" * 5_000}, {"text": "hi", "more": list(range(600))}
    for arguments in big_arguments:
        with within_budget(), pytest.raises(OverBudget):
            validate_arguments(arguments, ECHO)
    big_schema = {**ECHO, "enum": [{"text": str(i)} for i in range(3_000)]}
    validate_arguments({"text": "1"}, big_schema)  # its validator is built
    with within_budget(), pytest.raises(OverBudget):
        validate_arguments({"text": "1"}, big_schema)


def test_a_check_past_its_budget_stops_there_and_not_at_the_deadline():
    with pytest.raises(ValidationTimeout):
        validate_arguments({"q": "x"}, fan_out(40), timeout=0.05)  # its validator is built
    started = time.thread_time()
    with within_budget(0.005), pytest.raises(OverBudget):
        validate_arguments({"q": "x"}, fan_out(40), timeout=30)
    assert time.thread_time() - started < 1  # the budget, not the 30 s deadline


def test_a_budget_stops_inside_the_keys_times_patterns_of_one_keyword(monkeypatch):
    """`additionalProperties` tries every key against every pattern within one keyword (and
    runs before `patternProperties`, whose loop is checked: keywords go in sorted order). The
    budget (and the deadline) is checked per pattern there, not only before the next keyword,
    or a server's 600 patterns times an agent's 500 keys ran 0.35 s on the shared database
    thread past a 1 ms budget (found by a review)."""
    from approvals import validation

    schema = {
        "type": "object",
        "additionalProperties": False,
        "patternProperties": {f"^p{i:04d}x$": {} for i in range(300)},
    }
    arguments = {f"k{i:03d}": 1 for i in range(300)}
    with pytest.raises(InvalidArguments):  # built and checked once, off any budget
        validate_arguments(arguments, schema, timeout=60)
    searches = []
    search = validation._search

    def counted(pattern, text):
        searches.append(pattern)
        if pattern == "^p0000x$":
            validation._local.budget = -1  # spent from here on
        return search(pattern, text)

    monkeypatch.setattr(validation, "_search", counted)
    with within_budget(), pytest.raises(OverBudget):
        validate_arguments(arguments, schema, timeout=60)
    assert len(searches) <= 2  # was 300 x 300 before the next keyword's check


# Through the real web process --------------------------------------------------------------


@pytest.fixture
def web(transactional_db, settings):
    """The real ASGI application (config.asgi) served by uvicorn on loopback, in this process:
    the same shared API thread and validation threads as `uvicorn config.asgi:application`."""
    from config.asgi import application

    settings.ARGUMENT_VALIDATION_TIMEOUT = 8
    settings.AGENT_RATE_LIMIT = 100_000
    with start(application) as running:
        yield running.base_url


def make_tools(mode=ApprovalMode.ALWAYS_ASK):
    server = McpServer.objects.create(
        name="evil", url="https://mcp.example.com/mcp", approval_mode=mode
    )
    now = timezone.now()
    for name, schema in [
        ("fan_out", fan_out(40)),
        ("catastrophic", CATASTROPHIC),
        ("unique", UNIQUE),
        ("echo", {"type": "object", "properties": {"text": {"type": "string"}}}),
    ]:
        Tool.objects.create_from_definition(server, {"name": name, "inputSchema": schema}, now)
    _, attacker = Agent.create_with_token("attacker", [server])
    _, other = Agent.create_with_token("other", [server])
    return attacker, other


def post_call(base_url, token, tool, arguments, timeout=120):
    return httpx2.post(
        f"{base_url}/api/v1/tool-calls",
        json={"server": "evil", "tool": tool, "arguments": arguments},
        headers={"Authorization": f"Bearer {token}"},
        timeout=timeout,
    )


def test_another_agents_requests_finish_while_an_attack_runs(web):
    """The attack holds a validation thread until its deadline; meanwhile the other agent
    lists tools, asks for calls and reads them. Before the fix the attack held the thread all
    API database work shares, and the other agent waited for all of it."""
    attacker, other = make_tools()
    outcome = {}

    def attack():
        outcome["response"] = post_call(web, attacker, "fan_out", {"q": "x"})
        outcome["finished"] = time.monotonic()

    attack_thread = threading.Thread(target=attack)
    started = time.monotonic()
    attack_thread.start()
    time.sleep(0.5)  # let the attack reach the validation thread
    headers = {"Authorization": f"Bearer {other}"}
    for _ in range(5):
        assert httpx2.get(f"{web}/api/v1/tools", headers=headers, timeout=120).status_code == 200
        created = post_call(web, other, "echo", {"text": "hi"})
        assert created.status_code == 201, created.text
        read = httpx2.get(f"{web}/api/v1/tool-calls/{created.json()['id']}", headers=headers)
        assert read.json()["status"] == "pending_approval"
    others_done = time.monotonic()
    assert "response" not in outcome, "the attack ended before the other agent was served"
    attack_thread.join(timeout=120)
    response = outcome["response"]
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "validation_timeout"
    assert others_done < outcome["finished"]
    print(f"other agent: 15 requests in {others_done - started:.2f} s while the attack ran")


@pytest.mark.parametrize(
    "tool, arguments, message",
    [
        ("catastrophic", {"q": "a" * 5_000 + "!"}, "does not match"),
        ("unique", {"q": [*mixed_items(30_000), 8]}, "repeats an earlier item"),
    ],
)
def test_the_old_attacks_get_a_clear_answer(web, tool, arguments, message):
    attacker, _ = make_tools(mode=ApprovalMode.NO_APPROVAL)
    response = post_call(web, attacker, tool, arguments)
    assert response.status_code == 422, response.text[:300]
    error = response.json()["error"]
    assert error["code"] == "invalid_arguments"
    assert message in " ".join(error["details"])
    call = ToolCall.objects.get()
    assert (call.status, call.error_code, call.arguments) == (
        Status.BLOCKED,
        "invalid_arguments",
        {},
    )


def test_a_timed_out_check_leaves_only_an_audit_record(web):
    attacker, _ = make_tools(mode=ApprovalMode.NO_APPROVAL)
    response = post_call(web, attacker, "fan_out", {"q": "x"})
    assert response.status_code == 422
    assert response.json()["error"]["message"] == (
        "Checking the arguments against the tool's input schema took too long."
    )
    call = ToolCall.objects.get()
    assert (call.status, call.error_code) == (Status.BLOCKED, "validation_timeout")


@pytest.mark.usefixtures("roomy_budget")
def test_api_database_work_shares_one_thread_and_costly_checks_run_beside_it(
    web, monkeypatch, settings
):
    """Pins what config/asgi.py relies on: API requests skip Django's per-request thread, so
    their database calls share one thread; the argument checks run on threads of their own,
    except a provably cheap one (`_Request.decide_here`: the validator built, small arguments,
    within a budget of CPU), which the request's first hop to the database thread makes."""
    from approvals import models

    settings.ARGUMENT_VALIDATION_TIMEOUT = 0.5
    seen = {"db": set(), "checks": []}
    real_open, real_decide = models._open_request, models._Request.decide

    def open_request(*args):
        seen["db"].add(threading.current_thread().name)
        return real_open(*args)

    def decide(self):
        real_decide(self)  # recorded only once it decided (not when it stopped, over budget)
        seen["checks"].append((self.call.tool_name, threading.current_thread().name))

    monkeypatch.setattr(models, "_open_request", open_request)
    monkeypatch.setattr(models._Request, "decide", decide)
    attacker, other = make_tools()
    for _ in range(4):
        assert post_call(web, other, "echo", {"text": "hi"}).status_code == 201
    for _ in range(2):  # the second time its validator is built, and its budget runs out
        refused = post_call(web, attacker, "fan_out", {"q": "x"})
        assert refused.json()["error"]["code"] == "validation_timeout"
    assert len(seen["db"]) == 1
    echoes = [thread for tool, thread in seen["checks"] if tool == "echo"]
    assert echoes[1:] == [*seen["db"]] * 3  # the first one may have built the validator
    fan_outs = [thread for tool, thread in seen["checks"] if tool == "fan_out"]
    assert len(fan_outs) == 2 and all(name.startswith("validation") for name in fan_outs)


@pytest.mark.usefixtures("roomy_budget")
@pytest.mark.django_db
def test_a_request_with_rule_conditions_to_evaluate_is_not_decided_in_the_first_hop():
    """A rule's CEL condition runs over the agent's arguments at a cost no budget interrupts:
    such a decision is left to the validation threads (`afinish_tool_call`)."""
    from approvals.models import open_tool_call
    from approvals.rules import PolicyRule

    make_tools(mode=ApprovalMode.NO_APPROVAL)
    agent = Agent.objects.get(name="other")
    validate_arguments({"text": "hi"}, Tool.objects.get(name="echo").input_schema)  # built
    assert open_tool_call(agent, "evil", "echo", {"text": "hi"}).decide_here()
    PolicyRule.objects.create(
        server=McpServer.objects.get(), condition='args.text == "hi"', action="deny"
    )
    request = open_tool_call(agent, "evil", "echo", {"text": "hi"})
    assert not request.decide_here() and request.decision is None


@pytest.mark.usefixtures("roomy_budget")
@pytest.mark.django_db(transaction=True)
def test_the_mcp_endpoints_cheap_decision_is_made_in_the_hop_that_stores_the_call(
    monkeypatch, settings
):
    """The MCP endpoint's `tools/call` has no first hop of its own to decide in (the SDK may
    still refuse the request after the agent's): `afinish_tool_call(try_here=True)` decides a
    provably cheap request on the database thread, in the hop that looks for its twin and
    stores it, under the agent's re-attach lock; one past its budget, or with rule conditions,
    is still decided on a validation thread."""
    from asgiref.sync import async_to_sync

    from approvals import models
    from approvals.rules import PolicyRule

    settings.ARGUMENT_VALIDATION_TIMEOUT = 0.5
    seen = []
    real_decide = models._Request.decide

    def decide(self):
        real_decide(self)  # recorded only once it decided (not when it stopped, over budget)
        seen.append((self.call.arguments, threading.current_thread().name))

    monkeypatch.setattr(models._Request, "decide", decide)
    make_tools()  # calls that go to a human: a repeat re-attaches to one
    agent = Agent.objects.get(name="other")

    @async_to_sync
    async def finish(tool, arguments):
        request = await models.sync_to_async(models.open_tool_call)(agent, "evil", tool, arguments)
        try:
            _, created = await models.afinish_tool_call(
                request, run_here=True, reattach=True, try_here=True
            )
        except models.Refused as refused:
            return refused.code
        return "stored" if created else "re-attached"  # a twin is read with few fields

    validate_arguments({"text": "hi"}, Tool.objects.get(name="echo").input_schema)  # built
    assert finish("echo", {"text": "first"}) == "stored"
    assert finish("echo", {"text": "first"}) == "re-attached"
    assert [call.status for call in ToolCall.objects.all()] == [Status.PENDING_APPROVAL]
    with pytest.raises(ValidationTimeout):  # its validator built, as echo's
        validate_arguments({"q": "x"}, Tool.objects.get(name="fan_out").input_schema, timeout=0.01)
    assert finish("fan_out", {"q": "x"}) == "validation_timeout"  # past its budget
    PolicyRule.objects.create(
        server=McpServer.objects.get(), condition='args.text == "ruled"', action="deny"
    )
    assert finish("echo", {"text": "ruled"}) == "rule_denied"
    threads = {str(arguments): thread for arguments, thread in seen}
    assert not threads["{'text': 'first'}"].startswith("validation")
    assert threads["{'text': 'ruled'}"].startswith("validation")
    assert threads["{'q': 'x'}"].startswith("validation")  # refused there, at its deadline
