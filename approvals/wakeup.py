"""Waking the agents that wait for a tool call (approvals/waiting.py) the moment it is final.

The process that moves a call to a final state rings after commit (`ring`): the waiters of its
own event loops are woken directly, and the other processes through one of these, chosen by
TOOL_CALL_WAKEUP ("auto": the first that applies):
- `redis`: a pub/sub channel on the broker's Redis (under the broker's key prefix);
- `postgres`: LISTEN/NOTIFY on the database (a notification is per database);
- `doorbell`: the embedded default (SQLite + file broker, one machine): a unix datagram
  socket per listening event loop in a folder beside the SQLite file, and the finishing
  process sends the call id to each of them;
- `poll`: none; waiters learn of the result from the safety poll only.
A web process has one listener per event loop (not one per waiter), started by its first
waiter. A lost message costs latency, never an outcome: waiting.py's slow poll is the safety
net, and the listener asks for a poll each time it (re)connects.
"""

import asyncio
import atexit
import contextlib
import logging
import os
import queue
import threading
import weakref
from functools import partial
from pathlib import Path

from django.conf import settings
from django.db import connection, transaction

from integrations import doorbell

logger = logging.getLogger(__name__)

CHANNEL = "toolgate_call_finished"
RECONNECT_SECONDS = 1.0  # after a listener lost its connection
_local = weakref.WeakKeyDictionary()  # event loop -> callback(call ids), this process's waiters


def ring(call_id):
    """Tell every waiter of `call_id`, in this process and the others, once the transaction
    that made it final commits (at once outside a transaction)."""
    transaction.on_commit(partial(_ring_now, call_id))


def _ring_now(call_id):
    for loop, callback in list(_local.items()):
        with contextlib.suppress(RuntimeError):  # a loop closed since
            loop.call_soon_threadsafe(callback, [call_id])
    try:
        transport().publish(call_id)
    except Exception:  # the call is final whatever happens here; the safety poll catches up
        logger.warning("Could not announce that tool call %s finished", call_id, exc_info=True)


_announcements = None  # this process's queue for its publisher thread, made on first use
_announcements_lock = threading.Lock()


def _publisher():
    """The queue of this process's publisher thread (Redis), started on first use; a forked
    child (a prefork worker) starts its own, since threads don't survive a fork."""
    global _announcements
    with _announcements_lock:
        if _announcements is None:
            _announcements = queue.SimpleQueue()
            threading.Thread(
                target=_publish_forever, args=(_announcements,), name="wakeup-publisher",
                daemon=True,
            ).start()  # fmt: skip
        return _announcements


def _publish_forever(announcements):
    while True:
        url, channel, message = announcements.get()
        if url is None:  # `_flush`'s marker: everything put before it has gone out
            message.set()
            continue
        try:
            Redis.send(url, channel, message)
        except Exception:  # the call is final whatever happens here; the safety poll catches up
            logger.warning("Could not announce that tool call %s finished", message, exc_info=True)


@atexit.register
def _flush(timeout=2.0):
    """At exit, send what is still queued (a process that finished a call and ends at once,
    e.g. a `manage.py` command): the publisher is a daemon thread, which exit would stop."""
    if _announcements is not None:
        sent = threading.Event()
        _announcements.put((None, None, sent))
        sent.wait(timeout)


def _forget_publisher():
    global _announcements, _announcements_lock
    _announcements, _announcements_lock = None, threading.Lock()
    Redis._clients = {}  # a client's sockets are the parent's


os.register_at_fork(after_in_child=_forget_publisher)


def subscribe_here(callback):
    """Have `callback(call_ids)` run in the running loop when a call of this process is final."""
    _local[asyncio.get_running_loop()] = callback


async def listen(on_call_ids, on_connected):
    """Run until cancelled: `on_call_ids(ids)` for every announcement from another process, and
    `on_connected()` each time the listener (re)connects (what was announced before is lost)."""
    while True:
        try:
            await transport().listen(on_call_ids, on_connected)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.warning("Lost the tool-call wake-up listener; reconnecting", exc_info=True)
        await asyncio.sleep(RECONNECT_SECONDS)


def kind():
    """The transport TOOL_CALL_WAKEUP names, with "auto" resolved."""
    chosen = settings.TOOL_CALL_WAKEUP
    if chosen != "auto":
        return chosen
    if settings.CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
        return "redis"
    if connection.vendor == "postgresql":
        return "postgres"
    if connection.vendor == "sqlite":
        return "doorbell"
    return "poll"


def transport():
    return {"redis": Redis, "postgres": Postgres, "doorbell": Doorbell, "poll": Poll}[kind()]()


def _parse(payloads):
    ids = []
    for payload in payloads:
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            ids.append(int(payload))
    return ids


class Poll:
    def publish(self, call_id):
        pass

    async def listen(self, on_call_ids, on_connected):
        on_connected()
        await asyncio.Event().wait()  # forever


class Redis:
    """Pub/sub on the broker's Redis, the channel under the broker's key prefix (so test runs
    and deployments sharing a Redis don't wake each other)."""

    _clients = {}  # url -> a thread-safe client with its own pool

    def __init__(self):
        self.url = settings.CELERY_BROKER_URL
        prefix = settings.CELERY_BROKER_TRANSPORT_OPTIONS.get("global_keyprefix", "")
        self.channel = f"{prefix}{CHANNEL}"

    def publish(self, call_id):
        """Hand the announcement to this process's publisher thread: the PUBLISH's round trip
        (a second at most, when Redis is down) must not hold the thread that finished the
        call, which in the web process is the database thread every agent's request shares
        (config/asgi.py; issue 11 measured ~6 % of that thread's time in it)."""
        _publisher().put((self.url, self.channel, str(call_id)))

    @classmethod
    def send(cls, url, channel, message):
        import redis

        client = cls._clients.get(url)
        if client is None:
            # Short timeouts: a Redis that is down must not hold announcements up for long.
            client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
            cls._clients[url] = client
        client.publish(channel, message)

    async def listen(self, on_call_ids, on_connected):
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(self.url)
        try:
            async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                await pubsub.subscribe(self.channel)
                on_connected()
                async for message in pubsub.listen():
                    on_call_ids(_parse([message["data"]]))
        finally:
            await client.aclose()


class Postgres:
    """LISTEN/NOTIFY: the finishing process notifies on its own database connection, after
    commit; each listener holds one connection of its own."""

    def publish(self, call_id):
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, %s)", [CHANNEL, str(call_id)])

    async def listen(self, on_call_ids, on_connected):
        import psycopg

        # What Django connects with (OPTIONS such as sslmode included), less its sync classes.
        params = connection.get_connection_params()
        for django_only in ("cursor_factory", "context", "prepare_threshold"):
            params.pop(django_only, None)
        async with await psycopg.AsyncConnection.connect(**params, autocommit=True) as conn:
            await conn.execute(f"LISTEN {CHANNEL}")
            on_connected()
            async for notify in conn.notifies():
                on_call_ids(_parse([notify.payload]))


class Doorbell:
    """A doorbell (integrations/doorbell.py) per listener in `<SQLite file>-wake/`: the
    processes that share the database file share the doorbells."""

    def __init__(self):
        self.folder = Path(f"{connection.settings_dict['NAME']}-wake")

    def publish(self, call_id):
        doorbell.ring(self.folder, str(call_id).encode())

    async def listen(self, on_call_ids, on_connected):
        loop = asyncio.get_running_loop()
        try:
            bell = doorbell.Doorbell(self.folder)
        except OSError:  # e.g. a path longer than a socket address allows
            logger.warning(
                "No doorbell in %s: waiters rely on the poll", self.folder, exc_info=True
            )
            return await Poll().listen(on_call_ids, on_connected)
        ready = asyncio.Event()
        loop.add_reader(bell.fileno(), ready.set)
        try:
            on_connected()
            while True:
                await ready.wait()
                ready.clear()
                on_call_ids(_parse(bell.drain()))
        finally:
            loop.remove_reader(bell.fileno())
            bell.close()
