"""LangChain's MCP adapters (`langchain-mcp-adapters`, on the Python SDK 1.x) loading Toolgate's
tools and calling one, as a LangChain agent would; run by tests/test_mcp_compat_langchain.py
with its throw-away venv's interpreter.

Usage: python agent.py SPEC-JSON, SPEC {"url", "token", "transport": "streamable_http" | "sse",
"tool", "arguments"}. Prints the tools it loaded, then the call's outcome, as JSON lines.
"""

import asyncio
import json
import sys

from langchain_mcp_adapters.client import MultiServerMCPClient


def out(**event):
    print(json.dumps(event, default=str), flush=True)


async def run(spec):
    client = MultiServerMCPClient({"toolgate": {
        "url": spec["url"], "transport": spec["transport"],
        "headers": {"Authorization": f"Bearer {spec['token']}"},
    }})  # fmt: skip
    tools = await client.get_tools()
    out(tools=[{"name": tool.name, "description": tool.description} for tool in tools])
    tool = next(tool for tool in tools if tool.name == spec["tool"])
    try:
        content = await tool.ainvoke(spec["arguments"])
    except Exception as error:  # a tool error, as LangChain raises it
        out(tool_error=f"{type(error).__name__}: {error}")
    else:
        out(content=content)


def main():
    try:
        asyncio.run(run(json.loads(sys.argv[1])))
    except BaseException as error:  # reported to the test, which judges it
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        out(error=f"{type(error).__name__}: {error}")
        sys.exit(1)


if __name__ == "__main__":
    main()
