"""ASGI entry point, served by uvicorn: Django, static files, and the agent MCP endpoint
(`/mcp/`, approvals/mcp/app.py; its session manager runs in the lifespan).

Two things keep a waiting agent (`?wait=`) down to a coroutine instead of a thread:
- every middleware is async-capable, and static files are served here by Starlette's async
  StaticFiles rather than by WhiteNoise's sync-only middleware;
- API requests skip Django's per-request thread (`ThreadSensitiveContext`): their short
  database calls share one thread, so hundreds of open requests don't hold hundreds of threads.
  They also skip the pages' middleware (sessions, users, CSRF, messages, axes:
  `settings.API_MIDDLEWARE`), each method of which would be a hop to that thread (issue 11).
  Nothing whose cost an agent or a server controls may run on that thread, or every agent
  waits behind it: checking a call's arguments (schema, personal data) runs on the validation
  threads instead (`approvals.models.arequest_tool_call`), unless it is provably cheap and
  stays within a budget of CPU (`_Request.decide_here`, `approvals.validation.within_budget`),
  and the scan of a call's result for instructions to the model, past a size whose scan is
  cheap whatever it says, on a thread of asgiref's (`ToolCall.arun`, `SCAN_IN_HOP_BYTES`).
  tests/test_validation.py pins both (one thread for the database work, the costly checks
  beside it, another agent served while an attack runs).
"""

import gc
import io
import json
import os
import sys

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django.setup(set_prefix=False)

import asyncio  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402

from asgiref.sync import sync_to_async  # noqa: E402
from django.conf import settings  # noqa: E402 - after setup
from django.core import signals  # noqa: E402
from django.core.exceptions import RequestAborted  # noqa: E402
from django.core.handlers.asgi import ASGIHandler, get_script_prefix  # noqa: E402
from django.urls import get_resolver, set_script_prefix  # noqa: E402
from starlette.staticfiles import StaticFiles  # noqa: E402

from approvals.api import START_IN_FIRST_HOP  # noqa: E402
from approvals.mcp.app import PREFIX as MCP_PREFIX  # noqa: E402
from approvals.mcp.app import McpApp  # noqa: E402
from approvals.running import replies_first  # noqa: E402


class ApiASGIHandler(ASGIHandler):
    """The agent API's requests: its own middleware (`settings.API_MIDDLEWARE`), and no
    per-request thread."""

    def load_middleware(self, is_async=False):
        # Django builds the chain from settings.MIDDLEWARE; point it at the API's list while
        # this handler builds its own (once, at import, before any request).
        pages = settings.MIDDLEWARE
        settings.MIDDLEWARE = settings.API_MIDDLEWARE
        try:
            super().load_middleware(is_async)
        finally:
            settings.MIDDLEWARE = pages

    async def __call__(self, scope, receive, send):
        await self.handle(scope, receive, send)

    def resolve_request(self, request):
        """Django's, with the match remembered per path: walking the URL patterns was ~9 µs of
        the loop's CPU a request (issue 11), for an answer that depends on the path and the
        URLconf alone. Keyed by the resolver too: Django makes a new one when ROOT_URLCONF
        changes (tests), and a request's own `urlconf` (no API middleware sets one) goes
        Django's way. Nothing changes a ResolverMatch once made, so requests can share one."""
        if hasattr(request, "urlconf"):
            return super().resolve_request(request)
        path = request.path_info
        if len(path) > CACHED_PATH_CHARS:  # a client's made-up path: not kept (memory)
            return super().resolve_request(request)
        request.resolver_match = _resolve(get_resolver(), path)
        return request.resolver_match

    async def read_body(self, receive):
        """Django's, into memory instead of a SpooledTemporaryFile (~2 µs a request, and a
        copy): `BodyLimit`, which wraps this handler, has bounded the body already."""
        body_file = io.BytesIO()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestAborted()
            body_file.write(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body_file.seek(0)
        return body_file

    async def handle(self, scope, receive, send):
        """Django's `ASGIHandler.handle` (5.2), but for the two hops to the database thread
        that sending the request signals took, each a GIL hand-over and a wake-up of the loop
        (issue 11): `request_started` goes out on that thread in the request's first hop
        (`approvals.api.START_IN_FIRST_HOP`: with the agent's lookup; the API's 404 needs no
        database), and `request_finished`, from the response's close, here, in the loop. Its
        receivers reset the URLconf and close this thread's database and cache connections,
        which the API does not use; the database thread's own are checked at the next
        request's start, as the MCP endpoint's are (approvals/mcp/app.py).

        A result the view replied with before it was recorded is recorded before this ends
        (`approvals.running.replies_first`)."""
        START_IN_FIRST_HOP.set(True)  # this request's own context (and its hops')
        async with replies_first():
            await self._handle(scope, receive, send)

    async def _handle(self, scope, receive, send):
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        request, error_response = self.create_request(scope, body_file)
        if request is None:
            body_file.close()
            await self.send_response(error_response, send)
            error_response.close()
            return

        # As Django does, a client that goes away while the view runs cancels it (never the
        # call it runs: approvals/running.py); but the view runs in this task, and only the
        # watch for the disconnect in one of its own: Django's second task and its
        # `asyncio.wait` were ~25 µs of the loop's CPU a request (issue 11).
        response = None
        with self.cancelled_on_disconnect(receive) as watch:
            response = await self.run_get_response(request)
            await self.send_response(response, send)
        if watch.error:  # the ASGI server broke the protocol (Django's handler raises it too)
            body_file.close()
            raise watch.error
        if response is None:  # the view was cancelled: no response to close
            signals.request_finished.send(sender=self.__class__)
        elif response.streaming:  # a file or a stream, whose close may block
            await sync_to_async(response.close)()
        else:
            response.close()  # the request's close (no uploads here) and the signal
        body_file.close()

    @contextlib.contextmanager
    def cancelled_on_disconnect(self, receive):
        """Django's `listen_for_disconnect(receive)` in a task, which cancels this one when it
        ends (the client went away, or the server broke the protocol: `.error`) while the block
        runs; the cancellation ends the block, as `asyncio.timeout`'s does. Once the block is
        done (the response sent: uvicorn then answers `http.disconnect` at once) it cancels
        nothing. A cancellation of this task from elsewhere passes through."""
        this = asyncio.current_task()
        watch = _Watch(asyncio.create_task(self.listen_for_disconnect(receive)), this)
        cancelling = this.cancelling()
        try:
            yield watch
        except asyncio.CancelledError:
            if not watch.cancelled or this.uncancel() > cancelling:
                raise
        finally:
            watch.stop()


class _Watch:
    """`ApiASGIHandler.cancelled_on_disconnect`'s watch of one request."""

    def __init__(self, listener, task):
        self.task, self.watching, self.cancelled, self.error = task, True, False, None
        listener.add_done_callback(self._ended)
        self.listener = listener

    def _ended(self, listener):
        if listener.cancelled():
            return
        exception = listener.exception()  # RequestAborted: the client went away
        if isinstance(exception, AssertionError):
            self.error = exception
        if self.watching:
            self.cancelled = True
            self.task.cancel()

    def stop(self):
        self.watching = False
        self.listener.cancel()


# The API's own paths are short (`/api/v1/tool-calls/<id>/cancel`); a longer one (anyone's, before
# authentication: the API's 404 matches every path) is resolved but not kept, so 1,024 long
# made-up paths can't hold megabytes.
CACHED_PATH_CHARS = 128


@functools.lru_cache(maxsize=1024)  # the API's paths, a call's id among them
def _resolve(resolver, path):
    return resolver.resolve(path)


class ToolgateASGIHandler(ASGIHandler):
    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/api/"):
            await api_application(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


class BodyLimit:
    """Django's ASGI handler reads a whole request body before any view runs, spooling it to
    a temporary file past FILE_UPLOAD_MAX_MEMORY_SIZE, with no limit and before anyone is
    authenticated: a client streaming gigabytes (no Content-Length needed) filled the disk.
    A body over `limit()` is answered 413 here without reading the rest (JSON on `/api/`);
    the JSON API and the forms keep their own, smaller limits below it. The MCP endpoint reads
    no more than 8 KiB before it authenticates, and has the JSON API's limit
    (approvals/mcp/app.py)."""

    def __init__(self, app):
        self.app = app

    @staticmethod
    def limit():
        return max(settings.API_MAX_BODY_BYTES, settings.DATA_UPLOAD_MAX_MEMORY_SIZE or 0)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit()
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > limit:
            return await self._too_large(scope, send, limit)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before its body was complete: nothing to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await self._too_large(scope, send, limit)
            if not message.get("more_body", False):
                break
        # A body in one message (the usual case) is passed on as it came, not copied.
        messages = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return messages.pop() if messages else await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _too_large(scope, send, limit):
        text = f"The request body is larger than {limit} bytes."
        if scope["path"].startswith("/api/"):
            text = json.dumps({"error": {"code": "too_large", "message": text}})
            kind = b"application/json"
        else:
            kind = b"text/plain; charset=utf-8"
        body = text.encode()
        headers = [
            (b"content-type", kind),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


api_application = BodyLimit(ApiASGIHandler())
django_application = BodyLimit(ToolgateASGIHandler())
static_files = StaticFiles(directory=settings.STATIC_ROOT, check_dir=False)
STATIC_PREFIX = "/" + settings.STATIC_URL.strip("/") + "/"
mcp_application = McpApp()
SWITCH_INTERVAL = 0.001  # seconds; see below

# What start-up made (modules, settings, URL patterns, the applications above: ~130,000
# objects) lives as long as the process. Frozen, the cyclic garbage collector no longer walks
# it on each full collection, a pause of ~100 ms for every request in flight, every ~1,500
# API calls (issue 11: GC 0.16-0.18 -> 0.10 ms a call, bench/README.md "loop path").
gc.collect()
gc.freeze()

# The event loop and the database thread hand work to each other twice per API call. When the
# one that is handed work finds the other holding the GIL (busy with the next request), it
# waits for the switch interval before the interpreter makes the holder let go: Python's
# default of 5 ms, longer than a whole call (~4 ms). At 1 ms, 16 agents got 227-246 calls/s
# instead of 172-208 on the embedded defaults, the CPU per call unchanged (bench/README.md).
sys.setswitchinterval(SWITCH_INTERVAL)


async def application(scope, receive, send):
    if scope["type"] == "http" and _is_mcp(scope["path"]):
        await mcp_application(scope, receive, send)
    elif scope["type"] == "http" and scope["path"].startswith(STATIC_PREFIX):
        scope = {**scope, "path": scope["path"][len(STATIC_PREFIX) - 1 :], "root_path": ""}
        await static_files(scope, receive, send)
    elif scope["type"] == "lifespan":
        await _lifespan(receive, send)
    else:
        await django_application(scope, receive, send)


def _is_mcp(path):
    return path == MCP_PREFIX or path.startswith(MCP_PREFIX + "/")


async def _lifespan(receive, send):
    """The MCP endpoint's session manager runs from start-up to shut-down (uvicorn's default
    `--lifespan auto` runs this), and has stopped before shut-down is reported complete."""
    message = await receive()
    if message["type"] != "lifespan.startup":
        return
    async with mcp_application.running():
        await send({"type": "lifespan.startup.complete"})
        while message["type"] != "lifespan.shutdown":
            message = await receive()
    await send({"type": "lifespan.shutdown.complete"})
