"""Agents waiting for a call to finish (`?wait=`), for a whole web process at once.

Each waiting request awaits an asyncio.Event in its event loop's registry. The registry is
woken by approvals/wakeup.py when a call reaches a final state (in this process directly, from
the others through one listener per loop), and sets the events of that call's waiters. A slow
poll, one indexed query for all waiters of the loop every POLL_SECONDS, is the safety net for
an announcement that was lost (a listener reconnecting, a broker hiccup). So a waiting agent
costs a coroutine and an event, and the database sees at most one small query a second.
"""

import asyncio
import logging
import time
import weakref
from collections import OrderedDict

from asgiref.sync import sync_to_async

from approvals import wakeup
from approvals.models import FINAL_STATUSES, ToolCall

logger = logging.getLogger(__name__)

POLL_SECONDS = 1.0  # the safety net only: announcements wake waiters at once
CHUNK = 500  # ids per query, well under every database's limit on parameters
# Calls announced final lately: a waiter that registers just after its call's announcement
# (it read the call, then the call finished, then it began to wait) is woken at once.
RECENT_SECONDS = 30
RECENT_MAX = 10_000

_registries = weakref.WeakKeyDictionary()  # event loop -> _Registry
_checks = set()  # checks started by a listener's (re)connection, referenced until done


def _finished(call_ids):
    finished = []
    for start in range(0, len(call_ids), CHUNK):
        chunk = call_ids[start : start + CHUNK]
        finished += ToolCall.objects.filter(pk__in=chunk, status__in=FINAL_STATUSES).values_list(
            "pk", flat=True
        )
    return finished


class _Registry:
    def __init__(self):
        self.waiters = {}  # call id -> set of asyncio.Event
        self.recent = OrderedDict()  # call id -> when it was announced final (monotonic)
        self.poller = None
        self.listener = None

    async def wait(self, call_id, seconds):
        event = asyncio.Event()
        self.waiters.setdefault(call_id, set()).add(event)
        if call_id in self.recent:
            event.set()
        self._start()
        try:
            await asyncio.wait_for(event.wait(), seconds)
        except TimeoutError:
            return False
        finally:
            events = self.waiters.get(call_id, set())
            events.discard(event)
            if not events:
                self.waiters.pop(call_id, None)
        return True

    def _start(self):
        loop = asyncio.get_running_loop()
        if self.listener is None or self.listener.done():
            wakeup.subscribe_here(self.wake)
            self.listener = loop.create_task(wakeup.listen(self.wake, self.poll_soon))
        if self.poller is None or self.poller.done():
            self.poller = loop.create_task(self._poll())

    def wake(self, call_ids):
        now = time.monotonic()
        for call_id in call_ids:
            self.recent[call_id] = now
            self.recent.move_to_end(call_id)
            for event in self.waiters.get(call_id, ()):
                event.set()
        while self.recent and (
            len(self.recent) > RECENT_MAX or next(iter(self.recent.values())) < now - RECENT_SECONDS
        ):
            self.recent.popitem(last=False)

    def poll_soon(self):
        """The listener (re)connected: what was announced before it did is checked now."""
        check = asyncio.get_running_loop().create_task(self._check())
        _checks.add(check)
        check.add_done_callback(_checks.discard)

    async def _poll(self):
        while self.waiters:
            await asyncio.sleep(POLL_SECONDS)
            await self._check()

    async def _check(self):
        if not self.waiters:
            return
        try:
            finished = await sync_to_async(_finished)(list(self.waiters))
        except Exception:  # a database hiccup: waiters keep waiting, the next tick retries
            logger.warning("Could not check waited-for tool calls", exc_info=True)
            return
        for call_id in finished:
            for event in self.waiters.get(call_id, ()):
                event.set()


async def wait_until_final(call_id, seconds):
    """Return when the call reaches a final state (True) or `seconds` have passed (False)."""
    loop = asyncio.get_running_loop()
    registry = _registries.get(loop)
    if registry is None:
        registry = _registries[loop] = _Registry()
    return await registry.wait(call_id, seconds)
