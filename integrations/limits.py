"""Bounds on what an MCP server may hand Toolgate at sync.

Two kinds of bound:

* **Refused**: a tool whose name is outside the MCP naming rules (SEP-986: 1 to 128 ASCII
  letters, digits, `_`, `-`, `.`; the SDK's own `validate_tool_name`) or whose definition is
  larger than `MCP_MAX_TOOL_DEFINITION_BYTES` or nested deeper than `MAX_DEFINITION_DEPTH` is
  not stored at all (`tool_refusal`). A name
  is what the worker calls, so it is never cut to fit a column: a cut name could be another
  tool's (`"a" * 200 + "_readonly"` cut to 200 is `"a" * 200`).
* **Flagged**: an input schema that would make argument validation expensive
  (`schema_problems`): too large, too deep, too many `$ref`, a reference fan-out (`allOf` of
  `$ref`s of `allOf`s…) whose expansion is exponential, a `$ref` cycle that never descends
  into the arguments, or a `pattern` RE2 can't compile. The scanner turns these into a
  `complex_schema` warning, so the tool needs a human before it runs; validation itself is
  bounded by its deadline whatever the schema (`approvals/validation.py`).
"""

import functools
import json
import math
import re

import re2
from django.conf import settings
from mcp.shared.tool_name_validation import validate_tool_name

MAX_DEFINITION_DEPTH = 100  # nesting of a whole tool definition (stored and fingerprinted)
MAX_SCHEMA_BYTES = 32 * 1024  # canonical JSON of one input schema
MAX_SCHEMA_DEPTH = 32  # nesting of JSON values inside it
MAX_SCHEMA_REFS = 200  # `$ref` / `$dynamicRef` keywords in it
MAX_EXPANDED_NODES = 5_000  # subschemas visited with every local `$ref` expanded in place
MAX_PATTERN_BYTES = 1_000  # characters of one `pattern` / `patternProperties` key
PATTERN_MAX_MEM = 1 << 20  # bytes RE2 may use to compile one of them


# What json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False) builds on
# every call, made once: the encoder keeps no state between calls.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(value):
    """The canonical JSON of `value` (the form fingerprints are taken of)."""
    return _CANONICAL.encode(value)


def canonical_size(value):
    """Bytes of the canonical JSON of `value`."""
    return len(canonical_json(value).encode())


def tool_refusal(definition):
    """Why a listed tool is not stored (a sentence for the server's page), or None."""
    name = definition.get("name")
    if not isinstance(name, str) or not validate_tool_name(name).is_valid:
        shown = name if isinstance(name, str) else repr(name)
        shown = json.dumps(shown[:60] + ("…" if len(shown) > 60 else ""), ensure_ascii=False)
        length = f" ({len(name)} characters)" if isinstance(name, str) and len(name) > 60 else ""
        return (
            f"the tool {shown}{length} has a name outside the MCP naming rules "
            "(1 to 128 letters, digits, “_”, “-” or “.”)"
        )
    if _depth_and_refs(definition)[0] > MAX_DEFINITION_DEPTH:
        return (
            f"the tool “{name}” has a definition nested deeper than {MAX_DEFINITION_DEPTH} levels"
        )
    size, limit = canonical_size(definition), settings.MCP_MAX_TOOL_DEFINITION_BYTES
    if size > limit:
        return (
            f"the tool “{name}” has a definition of {size:,} bytes, over the {limit:,}-byte limit"
        )
    return None


@functools.lru_cache(maxsize=1024)
def compile_pattern(pattern):
    """A JSON Schema `pattern` compiled by RE2 (linear time, bounded memory), or None when RE2
    can't take it (lookarounds, backreferences, too large)."""
    if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN_BYTES:
        return None
    options = re2.Options()
    options.max_mem = PATTERN_MAX_MEM
    options.log_errors = False
    try:
        return re2.compile(pattern, options)
    except re2.error:
        return None


def schema_problems(schema):
    """Why validating arguments against `schema` could be expensive, as sentences; [] if none."""
    if not isinstance(schema, dict):
        return []
    depth, refs = _depth_and_refs(schema)
    if depth > MAX_SCHEMA_DEPTH:
        return [f"its input schema is nested deeper than {MAX_SCHEMA_DEPTH} levels"]
    size = canonical_size(schema)
    if size > MAX_SCHEMA_BYTES:
        return [f"its input schema is {size:,} bytes, over the {MAX_SCHEMA_BYTES:,}-byte limit"]
    if refs > MAX_SCHEMA_REFS:
        return [f"its input schema has {refs} references, over the limit of {MAX_SCHEMA_REFS}"]
    return _Expansion(schema).problems()


def _depth_and_refs(schema):
    stack, deepest, refs = [(schema, 1)], 0, 0
    while stack:
        value, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(value, dict):
            refs += sum(1 for key in ("$ref", "$dynamicRef") if isinstance(value.get(key), str))
            stack.extend((child, level + 1) for child in value.values())
        elif isinstance(value, list):
            stack.extend((child, level + 1) for child in value)
    return deepest, refs


# Applicators: keywords whose value is a subschema (or a list or map of them). "In place" ones
# apply to the same part of the arguments; the others to a part inside it.
_IN_PLACE = {"not", "if", "then", "else"}
_IN_PLACE_LISTS = {"allOf", "anyOf", "oneOf"}
_IN_PLACE_MAPS = {"dependentSchemas", "dependencies"}
_INSIDE = {
    "items", "additionalItems", "additionalProperties", "contains", "propertyNames",
    "unevaluatedItems", "unevaluatedProperties",
}  # fmt: skip
_INSIDE_LISTS = {"prefixItems", "items"}
_INSIDE_MAPS = {"properties", "patternProperties"}


def _subschemas(node):
    """(child schema, applies in place?) for each applicator of a schema object."""
    for key, value in node.items():
        if key in _IN_PLACE | _INSIDE and isinstance(value, dict | bool):
            yield value, key in _IN_PLACE
        elif key in _IN_PLACE_LISTS | _INSIDE_LISTS and isinstance(value, list):
            yield from ((child, key in _IN_PLACE_LISTS) for child in value)
        elif key in _IN_PLACE_MAPS | _INSIDE_MAPS and isinstance(value, dict):
            yield from ((child, key in _IN_PLACE_MAPS) for child in value.values())


class _Expansion:
    """Walks the schema as validation would, following local `$ref`s, counting subschemas
    (memoised per target, so a fan-out is counted without being expanded) and checking every
    pattern on the way."""

    def __init__(self, schema):
        self.root = schema
        self.anchors = _anchors(schema)
        self.cost = {}  # id(node) -> expanded size, capped
        self.found = []

    def problems(self):
        expanded = self._expanded_size()
        if expanded > MAX_EXPANDED_NODES:
            self.found.append(
                f"its input schema expands (through $ref, allOf, anyOf, oneOf…) to more than "
                f"{MAX_EXPANDED_NODES:,} subschemas"
            )
        return list(dict.fromkeys(self.found))

    def _target(self, node):
        ref = node.get("$ref", node.get("$dynamicRef"))
        if not isinstance(ref, str) or not ref.startswith("#"):
            return None  # not followed: validation refuses what it can't resolve
        if ref in self.anchors:
            return self.anchors[ref]
        target = self.root
        for token in ref[1:].split("/")[1:] if ref != "#" else []:
            token = token.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and token in target:
                target = target[token]
            elif isinstance(target, list) and token.isdigit() and int(token) < len(target):
                target = target[int(token)]
            else:
                return None
        return target if isinstance(target, dict | bool) else None

    def _children(self, node):
        if not isinstance(node, dict):
            return []
        self._check_patterns(node)
        children = list(_subschemas(node))
        target = self._target(node)
        if target is not None:
            children.append((target, True))
        return children

    def _check_patterns(self, node):
        patterns = [node["pattern"]] if "pattern" in node else []
        if isinstance(node.get("patternProperties"), dict):
            patterns += list(node["patternProperties"])
        for pattern in patterns:
            if compile_pattern(pattern) is None:
                shown = json.dumps(str(pattern)[:60], ensure_ascii=False)
                self.found.append(
                    f"its input schema has a pattern ({shown}) that the safe regular-expression "
                    "engine can't run, so it is not checked"
                )

    def _expanded_size(self):
        """Post-order walk without recursion. A cycle that only goes through in-place
        applicators would loop forever on one value; one that descends ends with the
        arguments, so it counts once."""
        stack = [(self.root, iter(self._children(self.root)), True)]
        on_path = {id(self.root): True}  # id -> did we reach it in place from its parent
        totals = [1]
        while stack:
            node, children, _ = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                on_path.pop(id(node), None)
                size = min(totals.pop(), MAX_EXPANDED_NODES + 1)
                self.cost[id(node)] = size
                if totals:
                    totals[-1] += size
                continue
            schema, in_place = child
            if id(schema) in on_path:
                if in_place and self._cycle_in_place(stack, schema):
                    self.found.append(
                        "its input schema refers to itself without descending into the "
                        "arguments, so validating would never end"
                    )
                totals[-1] += 1
            elif id(schema) in self.cost:
                totals[-1] += self.cost[id(schema)]
            elif totals[-1] <= MAX_EXPANDED_NODES:
                stack.append((schema, iter(self._children(schema)), in_place))
                on_path[id(schema)] = in_place
                totals.append(1)
        return self.cost[id(self.root)]

    @staticmethod
    def _cycle_in_place(stack, schema):
        """Whether every step from `schema` down the current path was an in-place one."""
        for node, _children, in_place in reversed(stack):
            if node is schema:
                return True
            if not in_place:
                return False
        return False


def _anchors(schema):
    found, stack = {}, [schema]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            for key in ("$anchor", "$dynamicAnchor"):
                if isinstance(value.get(key), str):
                    found.setdefault("#" + value[key], value)
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return found


MAX_BODY_DEPTH = 256  # far below the recursion limit that json.dumps meets when saving
_UNSTORABLE_TEXT = re.compile("[\x00\ud800-\udfff]")


def unstorable(value):
    """Why the database or a JSON encoder would refuse part of a value an agent sent, or None:
    JSON lets through numbers too large for a double (1e999 parses as inf), \\u0000 (which
    PostgreSQL refuses in text and jsonb) and unpaired surrogates (\\ud800, which UTF-8 can't
    encode), and nesting deep enough to exhaust the stack when it is saved. Checked by the one
    request path (`approvals.models`) for names and arguments, whatever the entry point."""
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if level > MAX_BODY_DEPTH:
            return f"it is nested deeper than {MAX_BODY_DEPTH} levels"
        if isinstance(item, dict):
            stack.extend((child, level + 1) for child in [*item, *item.values()])
        elif isinstance(item, list):
            stack.extend((child, level + 1) for child in item)
        elif isinstance(item, float) and not math.isfinite(item):
            return "a number in it is too large (such as 1e999)"
        elif isinstance(item, str) and _UNSTORABLE_TEXT.search(item):
            return "a string in it contains \\u0000 or an unpaired surrogate (\\ud800-\\udfff)"
    return None
