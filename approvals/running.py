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
import threading

from asgiref.sync import sync_to_async
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
    run = _start(call, **callbacks)
    known = asyncio.ensure_future(outcome.wait())
    try:
        await asyncio.wait([run, known], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        known.cancel()
    if outcome.is_set() and not run.done():
        replies.runs.add(run)
        run.add_done_callback(replies.runs.discard)


def _start(call, **callbacks):
    run = asyncio.ensure_future(call.arun(**callbacks))
    _runs.add(run)
    run.add_done_callback(_runs.discard)
    return run


class _Stored:
    """The calls one hop to the database thread stored for its request to run
    (`claimed_at_insert`), and whether that request was cancelled meanwhile."""

    def __init__(self, loop):
        self.loop, self.calls, self.abandoned = loop, [], False
        self.lock = threading.Lock()


_STORED = contextvars.ContextVar("toolgate_stored", default=None)


async def hop_that_stores(func, *args):
    """`await sync_to_async(func)(*args)`, for a hop that may store a call for this request to
    run (`request_tool_call(run_here=True)`). A request cancelled while the hop runs (its
    agent went away, an MCP client cancelled) never gets the call to run it; the hop goes on
    on its thread all the same, and its insert commits. Such a call is run here anyway, in
    the background, as it is when the agent goes away while it runs: it was stored `running`,
    and nothing else would ever send it (the sweeper would make it `unknown`, "may have run").
    A hop cancelled before it started stores nothing, as before."""
    stored = _Stored(asyncio.get_running_loop())
    token = _STORED.set(stored)
    try:
        return await sync_to_async(func)(*args)
    except asyncio.CancelledError:
        with stored.lock:
            stored.abandoned = True
            calls = stored.calls
        for call in calls:
            _start(call)
        raise
    finally:
        _STORED.reset(token)


def stored_to_run(call):
    """On the database thread: `call` was just stored `running` for this request to run. If
    the request was cancelled meanwhile, it is run in the background (`hop_that_stores`)."""
    stored = _STORED.get()
    if stored is None:  # not in such a hop (a synchronous caller): the caller runs it
        return
    with stored.lock:
        if not stored.abandoned:
            stored.calls.append(call)
            return
    # Not in this thread's context: asgiref's marks it as inside a hop, and the run's own hops
    # would refuse to wait for this thread ("would deadlock").
    stored.loop.call_soon_threadsafe(_start, call, context=contextvars.Context())


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
