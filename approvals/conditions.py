"""Rule conditions: CEL expressions over a tool call, compiled and evaluated by `cel-expr-python`
(the Python wrapper of Google's C++ CEL runtime). Why that library: docs/architecture.md.

A condition sees five variables:

- `args`: the call's arguments (a map; `args.amount`, `has(args.cc)`, `args["odd key"]`),
- `agent`, `server`, `tool`: the names of the agent, the MCP server and the tool,
- `now`: the time the call was requested (a UTC timestamp; `now.getHours("Europe/Paris")`).

Compiling type-checks the expression against those variables, so an unknown variable, a typo'd
function or a condition that can't be a boolean is refused when the rule is saved, with the
line and column. Evaluation is bounded: the runtime stops comprehensions (`exists`, `all`,
`map`, `filter`) after 10,000 iterations in all, regular expressions are RE2 (linear time), and
the agent API caps the size of the arguments. A failure at evaluation (a missing field, a
wrong type, the iteration budget) raises `ConditionError`; the policy then asks a human.
"""

import functools
import re

from cel_expr_python import cel

MAX_LENGTH = 4000  # characters of one condition

VARIABLES = {
    "args": cel.Type.Map(cel.Type.STRING, cel.Type.DYN),
    "agent": cel.Type.STRING,
    "server": cel.Type.STRING,
    "tool": cel.Type.STRING,
    "now": cel.Type.TIMESTAMP,
}
_ENV = cel.NewEnv(variables=VARIABLES)

# "ERROR: <input>:1:21: Syntax error: …" -> line 1, column 21
_POSITION = re.compile(r"<input>:(\d+):(\d+): ([^\n]*)")
_STATUS_PREFIX = re.compile(r"^[A-Z_]+: ")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_STATUS_SUFFIX = re.compile(r"\s*\[[A-Z_]+\]$")


class ConditionError(Exception):
    """A condition that does not compile (with `line` and `column`) or failed to evaluate."""

    def __init__(self, message, line=None, column=None):
        super().__init__(message)
        self.message, self.line, self.column = message, line, column


@functools.lru_cache(maxsize=2048)
def compile_condition(text):
    """The compiled program of `text`, cached per process (a rule's program is compiled once,
    whichever request evaluates it). Raises ConditionError saying where the problem is."""
    if not text.strip():
        raise ConditionError("Enter a condition; `true` matches every call.")
    if len(text) > MAX_LENGTH:
        raise ConditionError(f"The condition is longer than {MAX_LENGTH} characters.")
    try:
        program = _ENV.compile(text)
    except Exception as exc:  # the wrapper raises RuntimeError with the checker's report
        raise _compile_error(str(exc)) from None
    kind = program.return_type().name().lower()
    if kind not in ("bool", "dyn"):
        raise ConditionError(f"The condition must be true or false, not a {kind}.")
    return program


def _compile_error(report):
    found = _POSITION.search(report)
    if not found:
        return ConditionError(f"The condition does not compile: {_plain(report)}")
    line, column, problem = int(found[1]), int(found[2]), found[3].strip()
    return ConditionError(
        f"Line {line}, column {column}: {problem}".rstrip(), line=line, column=column
    )


def evaluate(text, variables):
    """True or False for `variables`; ConditionError when the condition can't be decided.

    The error's message never quotes values (the runtime's own messages may quote the
    arguments, which can carry personal data): quoted parts are replaced by "…".
    """
    program = compile_condition(text)
    try:
        value = program.eval(data=variables)
        result = value.plain_value()
        kind = value.type().name().lower()
    except Exception as exc:  # e.g. a string the runtime can't take (unpaired surrogate)
        raise ConditionError(_plain(str(exc), text)) from None
    if kind == "error":
        raise ConditionError(_plain(str(result), text))
    if not isinstance(result, bool):
        raise ConditionError(f"the condition gave a {kind}, not true or false")
    return result


def _plain(message, condition=""):
    """The runtime's message without its status codes, and without quoted parts that don't
    come from the condition itself (those may be the arguments' values)."""
    message = _STATUS_SUFFIX.sub("", _STATUS_PREFIX.sub("", message.strip()))

    def hide(match):
        return match[0] if match[0][1:-1] and match[0][1:-1] in condition else "…"

    return _QUOTED.sub(hide, message)[:300]


def literal(value):
    """`value` (JSON) written as a CEL literal, or None when CEL can't spell it exactly
    (integers outside 64 bits, non-finite numbers)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if -(2**63) <= value < 2**63 else None
    if isinstance(value, float):
        return repr(value) if value == value and abs(value) != float("inf") else None
    if isinstance(value, str):
        return _string_literal(value)
    if isinstance(value, list):
        items = [literal(item) for item in value]
        return None if None in items else "[" + ", ".join(items) + "]"
    if isinstance(value, dict):
        pairs = [(_string_literal(str(k)), literal(v)) for k, v in value.items()]
        if any(v is None for _, v in pairs):
            return None
        return "{" + ", ".join(f"{k}: {v}" for k, v in pairs) + "}"
    return None


def _string_literal(text):
    escaped = []
    for char in text:
        if char in '"\\':
            escaped.append("\\" + char)
        elif ord(char) < 32 or ord(char) == 127 or 0xD800 <= ord(char) <= 0xDFFF:
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'
