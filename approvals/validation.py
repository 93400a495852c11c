"""Checking tool-call arguments against the tool's input schema, bounded whatever the schema.

The schema comes from a third-party server and the arguments from an agent, so either side can
try to make validation expensive. What keeps it bounded:

* **No network**: `$ref` to a URL is not followed (the registry has no retriever).
* **A linear regex engine**: `pattern`, `patternProperties` (and the keywords that consult
  it: `additionalProperties`, `unevaluatedProperties`) run on RE2, which has no catastrophic
  backtracking. Python's `re` took 23 s, holding the GIL, on `^(a+)+$` against 28 "a"s and
  a "!". A pattern RE2 can't compile (lookarounds, backreferences) is not checked; the sync
  flags such a tool (`integrations.limits`).
* **`uniqueItems` in linear time**: jsonschema falls back to comparing every pair when items
  can't be sorted (strings mixed with numbers), 130 s on a 229 KB array; here items are
  compared by a canonical key in a set.
* **A deadline**: every keyword checks it before it runs, so a schema that fans out through
  `$ref` / `allOf` (26 s at depth 20) stops at `ARGUMENT_VALIDATION_TIMEOUT` with
  `ValidationTimeout`. Between two checks runs one keyword of one subschema on one value: one
  RE2 search, one `enum` comparison, at most a few milliseconds on the largest body the API
  accepts.
* **Depth**: arguments nested deeper than MAX_DEPTH are refused before jsonschema recurses.
* **Off the shared thread**: `off_the_shared_thread` runs the check on a small thread pool of
  its own, one check at a time per agent, so that all other API requests, whose database work
  shares one thread (config/asgi.py), never wait behind it (see `tests/test_validation.py`).
  Only a check that is provably cheap may run where its caller is (`within_budget`): small
  arguments, a small schema whose validator is already built, and INLINE_BUDGET seconds of
  the thread's CPU at most, past which it stops with `OverBudget` and goes to those threads.

Validators are built once per distinct schema and cached (`_validator`).
"""

import asyncio
import contextlib
import functools
import json
import threading
import time
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor

import jsonschema
from django.conf import settings
from jsonschema import ValidationError
from jsonschema.exceptions import SchemaError
from referencing import Registry
from referencing.exceptions import Unresolvable

from integrations.limits import compile_pattern

MAX_DEPTH = 64
MAX_MESSAGES = 10


class InvalidArguments(Exception):
    code = "invalid_arguments"

    def __init__(self, messages):
        super().__init__("; ".join(messages))
        self.messages = messages


class ValidationTimeout(InvalidArguments):
    """Checking the arguments took longer than ARGUMENT_VALIDATION_TIMEOUT."""

    code = "validation_timeout"


class OverBudget(Exception):
    """A check made `within_budget` was not provably cheap, or ran past its budget: it says
    nothing about the arguments, and must be made again off the shared thread."""


def depth(value, limit=MAX_DEPTH):
    """Nesting depth of a JSON value, giving up (returning limit + 1) past `limit`."""
    stack, deepest = [(value, 1)], 0
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((child, level + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, level + 1) for child in item)
    return deepest


def validate_arguments(arguments, schema, timeout=None):
    """Raise InvalidArguments (ValidationTimeout past the deadline) unless `arguments` match."""
    if not isinstance(arguments, dict):
        raise InvalidArguments(["arguments must be a JSON object"])
    schema = schema if isinstance(schema, dict) else {}
    budgeted = getattr(_local, "budget", None) is not None
    if budgeted and not (_small(arguments, *INLINE_ARGUMENTS) and _small(schema, *INLINE_SCHEMA)):
        raise OverBudget
    if depth(arguments) > MAX_DEPTH:
        raise InvalidArguments([f"arguments are nested deeper than {MAX_DEPTH} levels"])
    timeout = settings.ARGUMENT_VALIDATION_TIMEOUT if timeout is None else timeout
    with _deadline(timeout):
        try:
            # Building a validator checks the schema, unbounded: never within a budget.
            validator = _validator(json.dumps(schema, sort_keys=True), build=not budgeted)
            if validator is None:
                raise OverBudget
            errors = sorted(validator.iter_errors(arguments), key=lambda e: list(e.absolute_path))
        except SchemaError as exc:
            raise InvalidArguments([f"the tool's input schema is invalid: {exc.message}"]) from None
        except Unresolvable as exc:
            raise InvalidArguments(
                [f"the tool's input schema refers to {exc.ref!r}, which is not fetched"]
            ) from None
        except RecursionError:
            raise InvalidArguments(["the arguments or the schema are too deeply nested"]) from None
    if errors:
        raise InvalidArguments([_describe(error) for error in errors[:MAX_MESSAGES]])


async def off_the_shared_thread(agent_id, check):
    """Run `check()` (CPU work on arguments, no database) on the validation threads, one at a
    time per agent; answer at the validation deadline (plus a second of grace) even if the
    thread is still finishing its last keyword."""
    timeout = settings.ARGUMENT_VALIDATION_TIMEOUT
    async with _one_at_a_time(agent_id):
        work = asyncio.get_running_loop().run_in_executor(_executor(), check)
        try:
            return await asyncio.wait_for(asyncio.shield(work), timeout + 1)
        except TimeoutError:
            raise _timed_out(timeout) from None


# What `within_budget` takes as provably cheap: arguments and schema of at most this many values
# and characters of strings (the arguments: about a small JSON API body, which is parsed in its
# request's first hop too), and this much of the thread's CPU time for the check itself.
INLINE_ARGUMENTS = (500, 4096)
INLINE_SCHEMA = (2000, 32_768)
INLINE_BUDGET = 0.001


@contextlib.contextmanager
def within_budget(seconds=None):
    """Checks made in this block on this thread (`validate_arguments`) are provably cheap or
    raise `OverBudget`: arguments and schema small (INLINE_ARGUMENTS, INLINE_SCHEMA), the
    schema's validator already built, and at most `seconds` of this thread's CPU time (checked
    before every keyword, as the deadline is). For the policy's decision in the API's first hop
    to the shared database thread, where a check whose cost a server or an agent controls must
    not run (config/asgi.py); past the budget it is made again on the validation threads."""
    previous = getattr(_local, "budget", None)
    _local.budget = time.thread_time() + (INLINE_BUDGET if seconds is None else seconds)
    try:
        yield
    finally:
        _local.budget = previous


def _small(value, max_values, max_chars):
    """Whether a JSON value has at most `max_values` values and `max_chars` characters of
    strings (keys included), found in at most that many steps."""
    stack, values, chars = [value], 0, 0
    while stack:
        item = stack.pop()
        values += 1
        if values > max_values:
            return False
        if isinstance(item, dict | list) and values + len(stack) + len(item) > max_values:
            return False
        if isinstance(item, str):
            chars += len(item)
        elif isinstance(item, dict):
            chars += sum(len(key) for key in item if isinstance(key, str))
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        if chars > max_chars:
            return False
    return True


def _describe(error):
    where = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    return f"arguments{where}: {error.message[:300]}"


# --- The deadline ---------------------------------------------------------------------------

_local = threading.local()


@contextlib.contextmanager
def _deadline(seconds):
    previous = getattr(_local, "deadline", None)
    _local.deadline, _local.timeout = time.monotonic() + seconds, seconds
    _local.yielded = time.monotonic()
    try:
        yield
    finally:
        _local.deadline = previous


YIELD_EVERY = 0.002  # seconds of checking after which the thread lets others have the GIL


def _check_deadline():
    deadline = getattr(_local, "deadline", None)
    if deadline is None:
        return
    budget = getattr(_local, "budget", None)
    if budget is not None and time.thread_time() > budget:
        raise OverBudget
    now = time.monotonic()
    if now > deadline:
        raise _timed_out(_local.timeout)
    if now - _local.yielded > YIELD_EVERY:
        # Without this a check holds the GIL for whole switch intervals (5 ms) at a time, and
        # every other request of the process (the event loop, the shared API thread) queues
        # for it: sleep(0) hands it over at once to whoever waits.
        _local.yielded = now
        time.sleep(0)


def _timed_out(seconds):
    return ValidationTimeout(
        [
            f"checking the arguments against the tool's input schema took longer than "
            f"{seconds:g} s and was stopped; the schema or the arguments are too complex"
        ]
    )


def _bounded(keyword):
    """A jsonschema keyword function that first checks the deadline."""

    @functools.wraps(keyword)
    def checked(validator, value, instance, schema):
        _check_deadline()
        return keyword(validator, value, instance, schema)

    return checked


# --- Keywords on RE2 and in linear time -----------------------------------------------------


def _search(pattern, text):
    """RE2 search; a pattern RE2 can't compile is not checked (the sync flagged it)."""
    compiled = compile_pattern(pattern)
    return compiled is None or compiled.search(text) is not None


def _pattern(validator, pattern, instance, schema):
    if validator.is_type(instance, "string") and not _search(pattern, instance):
        yield ValidationError(f"{instance[:100]!r} does not match {pattern[:100]!r}")


def _pattern_properties(validator, pattern_properties, instance, schema):
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in pattern_properties.items():
        for key, value in instance.items():
            _check_deadline()
            if _search(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _matches_a_pattern(schema, key):
    # The deadline (and a budget) checked per pattern: `additionalProperties` and
    # `unevaluatedProperties` try every key against every pattern within one keyword, a
    # server's patterns times an agent's keys (600 x 500 took 0.35 s unchecked).
    for pattern in schema.get("patternProperties", {}):
        _check_deadline()
        if _search(pattern, key):
            return True
    return False


def _additional_properties(validator, additional, instance, schema):
    if not validator.is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    extras = [k for k in instance if k not in properties and not _matches_a_pattern(schema, k)]
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        if "patternProperties" in schema:
            verb = "does" if len(extras) == 1 else "do"
            joined = ", ".join(repr(extra)[:100] for extra in sorted(extras)[:20])
            patterns = ", ".join(repr(p)[:100] for p in sorted(schema["patternProperties"]))
            yield ValidationError(f"{joined} {verb} not match any of the regexes: {patterns}")
        else:
            shown = ", ".join(repr(extra)[:100] for extra in sorted(extras)[:20])
            verb = "was" if len(extras) == 1 else "were"
            yield ValidationError(
                f"Additional properties are not allowed ({shown} {verb} unexpected)"
            )


def _unevaluated_properties(validator, unevaluated, instance, schema):
    if not validator.is_type(instance, "object"):
        return
    evaluated = _evaluated_keys(validator, instance, schema)
    unexpected = [
        key
        for key in instance
        if key not in evaluated
        and next(validator.descend(instance[key], unevaluated, path=key), None) is not None
    ]
    if unexpected:
        shown = ", ".join(repr(key)[:100] for key in sorted(unexpected)[:20])
        yield ValidationError(f"Unevaluated properties are not allowed ({shown} unexpected)")


def _evaluated_keys(validator, instance, schema):
    """The keys of `instance` some keyword of `schema` evaluates, as jsonschema's own
    `find_evaluated_property_keys_by_schema` finds them, with patterns on RE2."""
    _check_deadline()
    if not isinstance(schema, dict):
        return set()
    keys = set()
    for ref_keyword in ("$ref", "$dynamicRef"):
        if isinstance(schema.get(ref_keyword), str):
            resolved = validator._resolver.lookup(schema[ref_keyword])
            inner = validator.evolve(schema=resolved.contents, _resolver=resolved.resolver)
            keys |= _evaluated_keys(inner, instance, resolved.contents)
    if validator.is_type(schema.get("properties"), "object"):
        keys |= schema["properties"].keys() & instance.keys()
    for keyword in ("additionalProperties", "unevaluatedProperties"):
        if keyword in schema:
            keys |= {k for k, v in instance.items() if _valid(validator, v, schema[keyword])}
    keys |= {key for key in instance if _matches_a_pattern(schema, key)}
    for key, subschema in schema.get("dependentSchemas", {}).items():
        if key in instance:
            keys |= _evaluated_keys(validator, instance, subschema)
    for keyword in ("allOf", "oneOf", "anyOf"):
        for subschema in schema.get(keyword, []):
            if _valid(validator, instance, subschema):
                keys |= _evaluated_keys(validator, instance, subschema)
    if "if" in schema:
        branch = "then" if _valid(validator, instance, schema["if"]) else "else"
        if branch == "then":
            keys |= _evaluated_keys(validator, instance, schema["if"])
        keys |= _evaluated_keys(validator, instance, schema.get(branch, {}))
    return keys


def _valid(validator, instance, subschema):
    return next(validator.descend(instance, subschema), None) is None


def _unique_items(validator, unique, instance, schema):
    if not (unique and validator.is_type(instance, "array")):
        return
    seen = set()
    for index, item in enumerate(instance):
        if index % 1024 == 0:
            _check_deadline()
        key = _canonical(item)
        if key in seen:
            yield ValidationError(f"item {index} repeats an earlier item: items must be unique")
            return
        seen.add(key)


def _canonical(value):
    """A key equal for JSON values JSON Schema calls equal: 1 == 1.0, but true != 1."""
    return json.dumps(_plain(value), sort_keys=True, separators=(",", ":"))


def _plain(value):
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


_OWN_KEYWORDS = {
    "pattern": _pattern,
    "patternProperties": _pattern_properties,
    "additionalProperties": _additional_properties,
    "unevaluatedProperties": _unevaluated_properties,
    "uniqueItems": _unique_items,
}


@functools.cache
def _bounded_class(draft):
    """`draft`'s validator with our keywords where it has them, every keyword deadline-bound."""
    keywords = {name: _OWN_KEYWORDS.get(name, fn) for name, fn in draft.VALIDATORS.items()}
    return jsonschema.validators.extend(
        draft, {name: _bounded(fn) for name, fn in keywords.items()}
    )


def _validator(schema_json, build=True):
    """The validator of a schema (its canonical JSON), built once and cached (the 512 most
    recently used); None if it isn't built yet and not `build`."""
    with _validators_lock:
        validator = _validators.get(schema_json)
        if validator is not None:
            _validators.move_to_end(schema_json)
            return validator
    if not build:
        return None
    schema = json.loads(schema_json)
    draft = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    draft.check_schema(schema)
    validator = _bounded_class(draft)(schema, registry=Registry())
    with _validators_lock:
        _validators[schema_json] = validator
        while len(_validators) > 512:
            _validators.popitem(last=False)
    return validator


_validators = OrderedDict()  # schema JSON -> validator, most recently used last
_validators_lock = threading.Lock()


# --- Off the shared thread ------------------------------------------------------------------


@functools.cache
def _executor():
    return ThreadPoolExecutor(
        max_workers=settings.ARGUMENT_VALIDATION_THREADS, thread_name_prefix="validation"
    )


_checks_per_agent = Counter()  # agent id -> checks running or waiting, in this process
_agent_locks = {}


@contextlib.asynccontextmanager
async def _one_at_a_time(agent_id):
    """One agent's checks run one after another: an agent flooding the API with costly
    arguments holds one validation thread, not all of them."""
    _checks_per_agent[agent_id] += 1
    lock = _agent_locks.setdefault(agent_id, asyncio.Lock())
    try:
        async with lock:
            yield
    finally:
        _checks_per_agent[agent_id] -= 1
        if not _checks_per_agent[agent_id]:
            del _checks_per_agent[agent_id], _agent_locks[agent_id]
