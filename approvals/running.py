"""Running an auto-approved call in the web process, for an agent that waits for it (the JSON
API's `?wait=` and the MCP endpoint alike), instead of handing it to a worker.

With REPLY_BEFORE_RECORD (off by default: see below), a small result reaches the agent before
it is recorded, when the request that runs the call will wait for the record after its reply
(`replies_first`, around the API's requests in config/asgi.py and the MCP endpoint's in
approvals/mcp/app.py): the reply goes out while the database thread writes the result (one
UPDATE and its commit, a durable write of ~0.3-0.5 ms on this project's machines), instead of
after it (issue 11). Nothing is lost by that order:
- the call was stored `running` before it reached the server, so a process lost between the
  reply and the record leaves it `running`, and the sweeper makes it `unknown` (it ran), as
  for a process lost a moment earlier;
- the request still ends only once the record is made, so its connection, a graceful
  shut-down and a test client awaiting the application all see the call recorded;
- the agent's next request to this process queues behind the record on the shared database
  thread (config/asgi.py), so it reads the call as recorded.
Anywhere else (a request served through WSGI; a Streamable HTTP session of the older
handshake, whose calls run in the context of the POST that opened it, long answered), the
result is recorded first, as before. A legacy SSE session's calls run in the context of its
GET stream, which is open while they run: they reply first, and the GET waits for their
records when it ends. Another process may read the call `running` for the moment between the
reply and the commit: that is why it is off by default (`bench latency`, reading the calls'
rows from its own process right after the last reply, found one of them not yet recorded).
"""

import asyncio
import contextlib
import contextvars

from django.conf import settings

_runs = set()  # runs started here, kept referenced until they finish


class _Replies:
    """The runs of one request whose result went out before its record."""

    def __init__(self):
        self.runs, self.open = set(), True


_REPLIES = contextvars.ContextVar("toolgate_replies", default=None)


async def run_here(call, timeout=None, **callbacks):
    """Run `call`, which this request has just stored auto-approved and already claimed
    (`running`, `ToolCall.claimed_at_insert`; `ToolCall.arun`), and return when its outcome is
    on `call` (a small result perhaps not recorded yet, see above), or after `timeout`
    seconds. The run is not tied to the waiting agent: it finishes and records its result
    even if the agent goes away or stops waiting."""
    replies = _REPLIES.get()
    outcome = asyncio.Event()
    if replies is not None and replies.open:  # set only with REPLY_BEFORE_RECORD
        callbacks["on_outcome"] = outcome.set
    run = asyncio.ensure_future(call.arun(**callbacks))
    _runs.add(run)
    run.add_done_callback(_runs.discard)
    known = asyncio.ensure_future(outcome.wait())
    try:
        await asyncio.wait([run, known], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        known.cancel()
    if outcome.is_set() and not run.done():
        replies.runs.add(run)
        run.add_done_callback(replies.runs.discard)


@contextlib.asynccontextmanager
async def replies_first():
    """Around a request: let its runs reply before they record a small result, and once it
    has replied, wait for those records. With REPLY_BEFORE_RECORD off (the default), nothing."""
    if not settings.REPLY_BEFORE_RECORD:
        yield
        return
    replies = _Replies()
    token = _REPLIES.set(replies)
    try:
        yield
    finally:
        _REPLIES.reset(token)
        replies.open = False
        if replies.runs:
            await asyncio.wait(set(replies.runs))
