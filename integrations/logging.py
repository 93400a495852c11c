"""A logging filter that keeps MCP secrets out of log output.

A server URL may carry a key in its path or query string, and libraries we call log full URLs
and headers. This filter runs on every record the console handler writes: URLs are cut down
to their origin and bearer tokens are masked, wherever they appear in the message.
"""

import logging
import re

_URL = re.compile(r"(?P<origin>https?://[^/\s'\"<>?#]+)(?P<rest>[^\s'\"<>]*)", re.IGNORECASE)
_BEARER = re.compile(r"(?P<scheme>bearer\s+)[^\s'\",]+", re.IGNORECASE)


def redact(text):
    """Return `text` with URLs reduced to scheme and host and bearer tokens masked."""
    text = _URL.sub(lambda m: m["origin"] + ("/[redacted]" if m["rest"] else ""), text)
    return _BEARER.sub(lambda m: m["scheme"] + "[redacted]", text)


class RedactSecretsFilter(logging.Filter):
    def filter(self, record):
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the logging module's problem, not ours
            return True
        cleaned = redact(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        record.msg, record.args = cleaned, None
        return True
