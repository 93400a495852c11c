"""A logging filter that keeps MCP secrets out of log output.

A server URL may carry a key in its path or query string, and libraries we call log full URLs
and headers. This filter runs on every record the console handler writes: URLs are cut down
to their origin and bearer tokens are masked, wherever they appear in the message. A record
logged while Toolgate talks to an MCP server (`redacting`) also loses that server's own
secrets, in every form `mcp_client.Endpoint.redact` knows.
"""

import contextlib
import contextvars
import logging
import re

_URL = re.compile(r"(?P<origin>https?://[^/\s'\"<>?#]+)(?P<rest>[^\s'\"<>]*)", re.IGNORECASE)
_BEARER = re.compile(r"(?P<scheme>bearer\s+)[^\s'\",]+", re.IGNORECASE)


def redact(text):
    """Return `text` with URLs reduced to scheme and host and bearer tokens masked."""
    text = _URL.sub(lambda m: m["origin"] + ("/[redacted]" if m["rest"] else ""), text)
    return _BEARER.sub(lambda m: m["scheme"] + "[redacted]", text)


_SERVER_REDACTION = contextvars.ContextVar("toolgate_server_redaction", default=None)


@contextlib.contextmanager
def redacting(redact_server):
    """Around a conversation with one MCP server: what is logged in this context (and in the
    tasks it starts, such as the SDK's readers and a pooled session's owner) also goes
    through `redact_server`. The SDK logs what a server sent it (an unknown SSE event's name,
    an unexpected content type, a message it could not parse, with its text), and a hostile
    or broken server may send its own token back; the generic patterns above don't know it."""
    token = _SERVER_REDACTION.set(redact_server)
    try:
        yield
    finally:
        _SERVER_REDACTION.reset(token)


def _redact_all(text):
    text, redact_server = redact(text), _SERVER_REDACTION.get()
    return redact_server(text) if redact_server else text  # URLs cut first: origins stay


class RedactSecretsFilter(logging.Filter):
    def filter(self, record):
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the logging module's problem, not ours
            return True
        cleaned = _redact_all(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = _redact_all(record.exc_text)
        record.msg, record.args = cleaned, None
        return True
