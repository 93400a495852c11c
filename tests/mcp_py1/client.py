"""The official Python MCP SDK 1.x as an agent, run by tests/test_mcp_compat_python1.py with the
throw-away venv's interpreter (tests/mcp_py1/requirements.txt): never imported by the suite.

Usage: python client.py SPEC-JSON, where SPEC is {"url", "token", "transport": "http" | "sse",
"protocol": a version to ask for in `initialize` or null for the SDK's latest, "steps": [...]}.
A step is "list", "ping", {"call": NAME, "arguments": {...}, "progress": bool},
{"task": NAME, "arguments": {...}, "cancel": bool} (2025-11-25 tasks: create, poll, result;
or cancel at once), {"level": LEVEL} or {"wait_list_changed": SECONDS}. Prints one JSON line
per event.
"""

import asyncio
import json
import sys
from datetime import timedelta

import mcp.types
from mcp import ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamablehttp_client


def out(**event):
    print(json.dumps(event, default=str), flush=True)


async def run(spec):
    if spec.get("protocol"):
        mcp.types.LATEST_PROTOCOL_VERSION = spec["protocol"]  # what `initialize` asks for
    headers = {"Authorization": f"Bearer {spec['token']}"}
    transport = (
        sse_client(spec["url"], headers=headers)
        if spec["transport"] == "sse"
        else streamablehttp_client(spec["url"], headers=headers)
    )
    changed = asyncio.Event()

    async def on_message(message):
        root = getattr(message, "root", None)
        if isinstance(root, mcp.types.ToolListChangedNotification):
            out(notification="tools/list_changed")
            changed.set()

    async def on_log(params):
        out(log={"level": params.level, "data": params.data})

    async with transport as streams, ClientSession(
        streams[0], streams[1], message_handler=on_message, logging_callback=on_log,
        read_timeout_seconds=timedelta(seconds=120),
    ) as session:  # fmt: skip
        init = await session.initialize()
        out(initialized={
            "protocolVersion": init.protocolVersion,
            "server": init.serverInfo.model_dump(),
            "capabilities": init.capabilities.model_dump(exclude_none=True),
        })  # fmt: skip
        for step in spec["steps"]:
            await run_step(session, step, changed)


async def run_step(session, step, changed):
    if step == "list":
        listed = await session.list_tools()
        out(tools=[tool.model_dump(by_alias=True, exclude_none=True) for tool in listed.tools])
    elif step == "ping":
        out(ping=(await session.send_ping()).model_dump(exclude_none=True))
    elif "level" in step:
        await session.set_logging_level(step["level"])
        out(level=step["level"])
    elif "wait_list_changed" in step:
        changed.clear()
        out(waiting="tools/list_changed")
        await asyncio.wait_for(changed.wait(), step["wait_list_changed"])
    elif "task" in step:
        await run_task(session, step)
    elif "call" in step:

        async def on_progress(progress, total, message):
            out(progress={"progress": progress, "total": total, "message": message})

        result = await session.call_tool(
            step["call"], step.get("arguments") or {},
            progress_callback=on_progress if step.get("progress") else None,
        )  # fmt: skip
        out(result=result.model_dump(by_alias=True, exclude_none=True, mode="json"))


async def run_task(session, step):
    tasks = session.experimental
    created = await tasks.call_tool_as_task(step["task"], step.get("arguments") or {})
    task_id = created.task.taskId
    out(taskCreated=created.task.model_dump(mode="json", exclude_none=True))
    if step.get("cancel"):
        cancelled = await tasks.cancel_task(task_id)
        out(taskCancelled=cancelled.model_dump(mode="json", exclude_none=True))
        return
    async for status in tasks.poll_task(task_id):
        out(taskStatus={"status": status.status, "statusMessage": status.statusMessage})
    if status.status == "completed":
        result = await tasks.get_task_result(task_id, mcp.types.CallToolResult)
        out(result=result.model_dump(by_alias=True, exclude_none=True, mode="json"))


def main():
    try:
        asyncio.run(run(json.loads(sys.argv[1])))
    except BaseException as error:  # reported to the test, which judges it
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        code = getattr(getattr(error, "error", None), "code", None)
        out(error=f"{type(error).__name__}: {error}", code=code)
        sys.exit(1)


if __name__ == "__main__":
    main()
