"""Running an auto-approved call in the web process, for an agent that waits for it (the JSON
API's `?wait=` and the MCP endpoint alike), instead of handing it to a worker."""

import asyncio

_runs = set()  # runs started here, kept referenced until they finish


async def run_here(call, timeout=None, **callbacks):
    """Run `call`, which this request has just stored auto-approved and already claimed
    (`running`, `ToolCall.claimed_at_insert`; `ToolCall.arun`), and return when it has
    finished, or after `timeout` seconds. The run is not tied to the waiting agent: it
    finishes and records its result even if the agent goes away or stops waiting."""
    run = asyncio.ensure_future(call.arun(**callbacks))
    _runs.add(run)
    run.add_done_callback(_runs.discard)
    await asyncio.wait([run], timeout=timeout)
