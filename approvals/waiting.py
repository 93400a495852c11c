"""Agents waiting for a call to finish (`?wait=`), for a whole web process at once.

Each waiting request awaits an asyncio.Event. One poller per event loop asks the database,
every POLL_SECONDS, which of all the awaited calls have reached a final state, and wakes
their waiters. So a waiting agent costs a coroutine and an event, and the database sees one
small query per tick however many agents wait.
"""

import asyncio
import logging
import weakref

from asgiref.sync import sync_to_async

from approvals.models import FINAL_STATUSES, ToolCall

logger = logging.getLogger(__name__)

# One indexed query for all waiters in the process, 20 times a second: ~25 ms added latency on
# average, and a cost that doesn't grow with the number of waiters (bench/README.md).
POLL_SECONDS = 0.05
CHUNK = 500  # ids per query, well under every database's limit on parameters

_registries = weakref.WeakKeyDictionary()  # event loop -> _Registry


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
        self.poller = None

    async def wait(self, call_id, seconds):
        event = asyncio.Event()
        self.waiters.setdefault(call_id, set()).add(event)
        if self.poller is None or self.poller.done():
            self.poller = asyncio.get_running_loop().create_task(self._poll())
        try:
            await asyncio.wait_for(event.wait(), seconds)
        except TimeoutError:
            pass
        finally:
            events = self.waiters.get(call_id, set())
            events.discard(event)
            if not events:
                self.waiters.pop(call_id, None)

    async def _poll(self):
        while self.waiters:
            await asyncio.sleep(POLL_SECONDS)
            try:
                finished = await sync_to_async(_finished)(list(self.waiters))
            except Exception:  # a database hiccup: waiters keep waiting, the next tick retries
                logger.warning("Could not check waited-for tool calls", exc_info=True)
                continue
            for call_id in finished:
                for event in self.waiters.get(call_id, ()):
                    event.set()


async def wait_until_final(call_id, seconds):
    """Return when the call reaches a final state or `seconds` have passed."""
    loop = asyncio.get_running_loop()
    registry = _registries.get(loop)
    if registry is None:
        registry = _registries[loop] = _Registry()
    await registry.wait(call_id, seconds)
