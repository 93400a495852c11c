"""Open upstream MCP sessions kept for the next call, per event loop (issue 11).

A fresh session costs the connection and the protocol negotiation (the SDK's
`server/discover` probe, or the `initialize` handshake): several HTTP requests and
milliseconds of CPU for a call that is one request on an open session. So
`mcp_client.acall_tool` (the web process's run path) leases a session from the pool of its
event loop:

- Keyed by everything that defines the connection: URL, transport, headers (the token is one),
  the OAuth credential's identity (which changes when the token is renewed), the connection
  guard's settings. Two servers with the same key share sessions; an edited server gets a
  new key, and `drop_server` (on save or delete, `integrations/signals.py`) closes the old
  sessions at once. A disabled server never gets this far: the policy refuses its calls.
- One call at a time per session: the session's hooks and callbacks relay to the current
  lease (its `_HttpTrace`, its progress/log/decline callbacks, its auth), so the byte budget,
  the guard's errors and the redaction are per call, as on a fresh session.
- At most MCP_POOL_SESSIONS idle sessions per key; a call that finds none idle opens one, and
  a session beyond the bound is closed after its call. Idle ones close after
  MCP_POOL_IDLE_TIMEOUT seconds.
- The protocol era is learned by the first session of a key and adopted by the next ones
  (no probe), until one of them fails to open.
- A session is returned to the pool only after a call that went well; after any failure it
  is closed. A call is never retried here: `mcp_client` retries nothing that may have
  reached the server, and what provably did not goes back to the caller as such
  (`McpError.reached_server`), like a fresh session's failure.
- Only Streamable HTTP: an SSE session is one event stream whose bytes the response cap
  counts from its start, so a long-lived one would eventually hit the cap mid-call. A
  handshake-era session's GET stream (the server's notifications) is one too: reaching the
  cap ends that stream, not the call running then (`_ends_the_session_stream`).

Each session is owned by a task of its own: the SDK's task groups must be exited by the task
that entered them, and a lease outlives no caller.

A sync caller (a Celery worker's task, `mcp_client.call_tool(pooled=True)`) has no event loop
that outlives its call, so each process has one on a thread of its own (`run_in_loop_thread`),
with its own pool: made on first use in the process that uses it, never inherited across a
fork (a prefork child makes its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import threading
import time
import weakref
from collections import OrderedDict

import httpx2
from django.conf import settings

logger = logging.getLogger(__name__)

_pools = weakref.WeakKeyDictionary()  # event loop -> Pool
_pools_lock = threading.Lock()


def pool():
    """The pool of the running event loop."""
    loop = asyncio.get_running_loop()
    with _pools_lock:
        found = _pools.get(loop)
        if found is None:
            found = _pools[loop] = Pool(loop)
        return found


def drop_server(server_pk):
    """Close the sessions of server `server_pk` in every pool of this process (from any
    thread): it was edited or deleted."""
    with _pools_lock:
        pools = list(_pools.items())
    for loop, found in pools:
        if loop.is_closed():
            continue
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(found.drop_server, server_pk)


_loop_thread = None  # (pid, loop, thread): this process's loop for sync callers, made on first use
_loop_thread_lock = threading.Lock()


def _forget_loop_thread():
    """In a forked child: the parent's loop thread did not come along (only the forking
    thread does), and its lock may have been held at the fork."""
    global _loop_thread, _loop_thread_lock
    _loop_thread, _loop_thread_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_loop_thread)


def loop_thread():
    """This process's event loop for sync callers, running on a daemon thread of its own."""
    global _loop_thread
    with _loop_thread_lock:
        found = _loop_thread
        if found is None or found[0] != os.getpid() or not found[2].is_alive():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="mcp-pool-loop", daemon=True)
            thread.start()
            _loop_thread = found = (os.getpid(), loop, thread)
        return found[1]


def close_loop_thread_sessions(timeout=5.0):
    """Close every open session of this process's loop thread, if it has one, and forget
    the eras it learned (the tests, between tests: a later server may get the same port)."""
    found = _loop_thread
    if found is None or found[0] != os.getpid() or not found[2].is_alive():
        return

    async def close():
        with _pools_lock:
            found_pool = _pools.get(asyncio.get_running_loop())
        if found_pool is not None:
            found_pool.close_all()

    asyncio.run_coroutine_threadsafe(close(), found[1]).result(timeout)


def run_in_loop_thread(make_coroutine, grace=5.0):
    """`await make_coroutine()` on this process's loop thread (`loop_thread`), from a thread
    without a loop, and return or raise what it did.

    Whatever interrupts the wait in the calling thread (Celery's soft time limit raises
    `SoftTimeLimitExceeded` there, from a signal handler) cancels the coroutine on the loop
    and is raised again once the coroutine has ended (`grace` seconds at most): its leased
    session is closed, not returned, so nothing of the call carries on behind the caller's
    back (a call that won't end by then is ended by the hard time limit, with the process)."""
    ended = threading.Event()

    async def run():
        try:
            return await make_coroutine()
        finally:
            ended.set()

    future = asyncio.run_coroutine_threadsafe(run(), loop_thread())
    try:
        return future.result()
    except BaseException:
        if not future.done():
            future.cancel()  # cancels the task on the loop (thread-safe)
            ended.wait(grace)
        raise


def connection_key(endpoint, transport):
    """What defines a connection, hashed (it holds secrets; the pool keeps only the digest)."""
    parts = (
        endpoint.url,
        transport,
        tuple(sorted(endpoint.headers.items())),
        endpoint.credential,
        endpoint.auth is not None,
        endpoint.allow_private_network,
        tuple(sorted(settings.MCP_EXTRA_BLOCKED_NETWORKS)),
        tuple(sorted(settings.MCP_EXTRA_ALLOWED_NETWORKS)),
        settings.MCP_MAX_RESPONSE_BYTES,
        settings.MCP_READ_TIMEOUT,
        settings.MCP_CONNECT_TIMEOUT,
    )
    return _digest(parts)


@functools.lru_cache(maxsize=256)
def _digest(parts):
    # Once per connection, not per call: on a call's path (caches cold after the network
    # round trip) the repr and the SHA-256 cost ~30 us. The memo holds the parts, secrets
    # included, as `mcp_client.secret_forms`' does: in memory, never in the pool's keys.
    return hashlib.sha256(repr(parts).encode()).hexdigest()


class Pool:
    """The idle sessions of one event loop, by connection key."""

    def __init__(self, loop):
        self.loop = loop
        self.idle = {}  # key -> [Session], most recently used last
        self.eras = OrderedDict()  # key -> Session.era
        self.opened = 0  # sessions opened, for the tests and the bench
        self._reaper = None

    async def lease(self, endpoint, transport, relay_state):
        """An open session for `endpoint`, already relaying to `relay_state` (the caller's
        trace, callbacks and auth). Raises what opening raised."""
        key = connection_key(endpoint, transport)
        session = self._take_idle(key)
        if session is None:
            session = Session(self, key, endpoint, transport, self.eras.get(key))
            session.relay.attach(relay_state)
            await session.open()
            self.opened += 1
            self._learn_era(key, session)
        else:
            session.relay.attach(relay_state)
        return session

    def release(self, session, healthy):
        session.relay.detach()
        if not healthy or not session.alive:
            session.close()
            return
        idle = self.idle.setdefault(session.key, [])
        if len(idle) >= settings.MCP_POOL_SESSIONS:
            session.close()
            return
        session.last_used = time.monotonic()
        idle.append(session)
        self._start_reaper()

    def drop_server(self, server_pk):
        for sessions in self.idle.values():
            for session in [s for s in sessions if s.server_pk == server_pk]:
                sessions.remove(session)
                session.close()
        for session in Session.busy_of(self, server_pk):
            session.retire = True  # closed when its call ends

    def close_all(self):
        for sessions in self.idle.values():
            for session in sessions:
                session.close()
        self.idle.clear()
        self.eras.clear()
        for session in [s for s in Session._busy if s.pool is self]:
            session.retire = True  # closed when its call ends

    def _take_idle(self, key):
        sessions = self.idle.get(key) or []
        while sessions:
            session = sessions.pop()
            if session.alive:
                return session
            session.close()
        return None

    def _learn_era(self, key, session):
        self.eras[key] = session.era
        self.eras.move_to_end(key)
        while len(self.eras) > 1000:
            self.eras.popitem(last=False)

    def forget_era(self, key):
        self.eras.pop(key, None)

    def _start_reaper(self):
        if self._reaper is None or self._reaper.done():
            self._reaper = self.loop.create_task(self._reap())

    async def _reap(self):
        # Sleeps before it looks: a reaper that looked first would find the session of a
        # caller calling in a loop already leased again, end, and be started anew by the
        # next `release` (a task per call).
        while True:
            timeout = settings.MCP_POOL_IDLE_TIMEOUT
            await asyncio.sleep(min(timeout / 2, 5))
            stale = time.monotonic() - timeout
            for key, sessions in list(self.idle.items()):
                for session in [s for s in sessions if s.last_used < stale or not s.alive]:
                    sessions.remove(session)
                    session.close()
                if not sessions:
                    del self.idle[key]
            if not self.idle:
                return

    def idle_count(self):
        return sum(len(sessions) for sessions in self.idle.values())


class Session:
    """One open upstream session, owned by a task of its own."""

    _busy = weakref.WeakSet()

    def __init__(self, pool, key, endpoint, transport, era):
        from integrations import mcp_client

        self.pool, self.key, self.server_pk = pool, key, endpoint.server_pk
        origin = mcp_client.url_origin(endpoint.url)  # valid: `mcp_client._run` parsed it
        self.relay = Relay(mcp_client._HttpTrace(origin, endpoint.url))
        mode, prior = era or ("auto", None)
        self.client = mcp_client._client(
            endpoint,
            transport,
            self.relay,
            self.relay.client_options(),
            auth=self.relay.auth_flow,
            mode=mode,
            prior_discover=prior,
        )
        self.last_used = time.monotonic()
        self.retire = False
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._task = None
        self._error = None

    @classmethod
    def busy_of(cls, pool, server_pk):
        return [s for s in cls._busy if s.pool is pool and s.server_pk == server_pk]

    async def open(self):
        """Connect and negotiate; raises what that raised (inside the caller's timeout)."""
        self._task = asyncio.get_running_loop().create_task(self._own())
        Session._busy.add(self)
        try:
            await self._ready.wait()
        except BaseException:
            self.close()
            raise
        if self._error is not None:
            self.pool.forget_era(self.key)  # the server may have changed eras
            raise self._error

    async def _own(self):
        try:
            async with self.client:
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:  # handed to the caller that opened it
            self._error = exc
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self._ready.set()

    @property
    def alive(self):
        task = self._task
        return task is not None and not task.done() and not self._stop.is_set() and not self.retire

    @property
    def era(self):
        """("legacy", None), or the modern version and the server's DiscoverResult."""
        session = self.client.session
        if session.discover_result is not None:
            return (self.client.protocol_version, session.discover_result)
        return ("legacy", None)

    def close(self):
        Session._busy.discard(self)
        self._stop.set()
        if self._task is not None and not self._ready.is_set():
            self._task.cancel()  # still connecting


class Relay:
    """What a pooled session's HTTP hooks, auth and SDK callbacks pass to: the current
    lease's trace, callbacks and auth, so nothing of one call reaches another."""

    def __init__(self, idle_trace):
        self.state = None
        self.idle_trace = idle_trace  # between calls: the origin check still applies

    def attach(self, state):
        self.state = state

    def detach(self):
        self.state = None

    @property
    def trace(self):
        return self.state.trace if self.state is not None else self.idle_trace

    # The _HttpTrace interface, for the guard and the event hooks.
    async def on_request(self, request):
        await self.trace.on_request(request)

    async def on_response(self, response):
        await self.trace.on_response(response)

    def on_guard_error(self, exc):
        if not _ends_the_session_stream(exc):
            self.trace.on_guard_error(exc)

    def on_connect_error(self, request):
        self.trace.on_connect_error(request)

    # The SDK's callbacks, to the current call's `_UpstreamRequests`.
    def client_options(self):
        return {
            "sampling_callback": self._sampling,
            "elicitation_callback": self._elicitation,
            "logging_callback": self._log,
        }

    async def _sampling(self, context, params):
        from integrations import mcp_client

        upstream = self.state and self.state.upstream
        if upstream is None:
            return mcp_client.declined_sampling()
        return await upstream.decline_sampling(context, params)

    async def _elicitation(self, context, params):
        from integrations import mcp_client

        upstream = self.state and self.state.upstream
        if upstream is None:
            return mcp_client.declined_elicitation()
        return await upstream.decline_elicitation(context, params)

    async def _log(self, params):
        upstream = self.state and self.state.upstream
        if upstream is not None and upstream.on_log:
            await upstream.log(params)

    @property
    def auth_flow(self):
        return _RelayedAuth(self)


def _ends_the_session_stream(exc):
    """Whether a guard error is about the session's own GET stream (the server's notifications,
    open from call to call) rather than a request of the current call. The response cap
    counts that stream's bytes over the session's life, so reaching it failed whichever call
    happened to run then (a server sending 5 KB of notifications a call, every call past the
    cap's worth), after its request reached the server. The stream ends (the SDK opens it
    again a second later); the call goes on. A GET with `Last-Event-ID` resumes a call's own
    stream."""
    try:
        request = exc.request
    except (AttributeError, RuntimeError):  # httpx2 raises RuntimeError when none was set
        return False
    return request.method == "GET" and "last-event-id" not in request.headers


class _RelayedAuth(httpx2.Auth):
    """The current call's auth (OAuth's `BearerAuth`), on a session opened for another call
    with the same credential: its renewals and its `failure` stay the call's own."""

    requires_request_body = True

    def __init__(self, relay):
        self.relay = relay

    async def async_auth_flow(self, request):
        auth = self.relay.state.auth if self.relay.state is not None else None
        if auth is None:
            yield request
            return
        flow = auth.async_auth_flow(request)
        request = await flow.__anext__()
        while True:
            response = yield request
            try:
                request = await flow.asend(response)
            except StopAsyncIteration:
                return
