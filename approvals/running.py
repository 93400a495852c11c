"""Running an auto-approved call in the web process, for an agent that waits for it (the JSON
API's `?wait=` and the MCP endpoint alike), instead of handing it to a worker."""

import asyncio

_runs = set()  # runs started here, kept referenced until they finish


async def run_here(call, **callbacks):
    """Run `call` (`ToolCall.arun`) and return when it has finished. The run is shielded from
    the waiting agent going away: once claimed, it finishes and records its result."""
    run = asyncio.ensure_future(call.arun(**callbacks))
    _runs.add(run)
    run.add_done_callback(_runs.discard)
    await asyncio.shield(run)
