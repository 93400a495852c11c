"""Checking tool-call arguments against the tool's input schema, safely.

The schema comes from a third-party server, so validation must never fetch anything (`$ref`
to a URL is not followed: the registry has no retriever) and must stay bounded on huge or
deeply nested input (the API caps the body size; the depth is checked here before jsonschema
recurses).
"""

import jsonschema
from jsonschema.exceptions import SchemaError
from referencing import Registry
from referencing.exceptions import Unresolvable

MAX_DEPTH = 64
MAX_MESSAGES = 10


class InvalidArguments(Exception):
    def __init__(self, messages):
        super().__init__("; ".join(messages))
        self.messages = messages


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


def validate_arguments(arguments, schema):
    if not isinstance(arguments, dict):
        raise InvalidArguments(["arguments must be a JSON object"])
    if depth(arguments) > MAX_DEPTH:
        raise InvalidArguments([f"arguments are nested deeper than {MAX_DEPTH} levels"])
    schema = schema if isinstance(schema, dict) else {}
    try:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        cls.check_schema(schema)
        validator = cls(schema, registry=Registry())
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


def _describe(error):
    where = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    return f"arguments{where}: {error.message[:300]}"
