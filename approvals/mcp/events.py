"""A session's recent SSE events, kept so a client whose stream broke can resume it.

Streamable HTTP resumability (basic/transports, "Resumability and Redelivery"): every event
on a session's streams gets an id; a client that lost a stream (a proxy cut a held call's
response, the network blinked) sends `GET` with `Last-Event-ID` on its session and gets what
it missed on that stream, then the rest of it, instead of losing the answer. From 2025-11-25
on the SDK also opens each stream with a "priming" event that carries an id, so a client that
received nothing yet can resume too.

One store per session (`SessionManager` gives each new session its own): the SDK names a
request's stream after the JSON-RPC request id, which every session reuses, so one store
shared by all sessions would mix one agent's answers into another's replay. Ids are random,
the last `KEPT` events of a session are kept, and the store goes with its session.

The manager also bounds the sessions one agent has open (MCP_MAX_SESSIONS_PER_AGENT, on any
of its endpoints): the SDK's own bound is for the whole process, so one agent opening sessions
within its rate limit (600 a minute, each kept for the SDK's 30-minute idle timeout) would
otherwise fill it and leave every other agent's `initialize` refused.
"""

import secrets
from collections import deque

from django.conf import settings
from mcp.server.streamable_http import EventMessage, EventStore
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

KEPT = 256


class SessionEvents(EventStore):
    def __init__(self, kept=KEPT):
        self._events = deque(maxlen=kept)  # (event id, stream id, message or None)

    async def store_event(self, stream_id, message):
        event_id = secrets.token_urlsafe(16)
        self._events.append((event_id, stream_id, message))
        return event_id

    async def replay_events_after(self, last_event_id, send_callback):
        events = list(self._events)
        position = next((i for i, event in enumerate(events) if event[0] == last_event_id), None)
        if position is None:
            return None
        stream_id = events[position][1]
        for event_id, stream, message in events[position + 1 :]:
            if stream == stream_id and message is not None:  # priming events have no message
                await send_callback(EventMessage(message, event_id))
        return stream_id


class TooManySessions(Exception):
    """An agent asked for a session while it has MCP_MAX_SESSIONS_PER_AGENT open; raised out
    of the SDK's request handling before anything was answered, for the app to answer."""


class SessionManager(StreamableHTTPSessionManager):
    """The SDK's session manager, with an event store of its own for each session, and at most
    MCP_MAX_SESSIONS_PER_AGENT sessions open for one agent."""

    def _admit_session(self, requestor):
        # The SDK calls this under its session-creation lock, without an await in between:
        # concurrent `initialize`s of one agent can't both take the last place.
        if requestor is not None and self._open_sessions(requestor["client_id"]) >= (
            settings.MCP_MAX_SESSIONS_PER_AGENT
        ):
            raise TooManySessions
        transport = super()._admit_session(requestor)
        if transport is not None:
            # The SDK would hand every session the manager's one store (see the docstring);
            # the transport reads its store from this attribute alone.
            transport._event_store = SessionEvents()
        return transport

    def _open_sessions(self, client_id):
        """The sessions open for the agent `client_id` names (`app._user`), on any endpoint:
        the SDK's record of each live session's owner, which it forgets as a session ends."""
        return sum(owner["client_id"] == client_id for owner in self._session_owners.values())
