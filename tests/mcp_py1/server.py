"""A FastMCP server of the official Python SDK 1.x, as an upstream of Toolgate, run by
tests/test_mcp_compat_upstreams.py with the throw-away venv's interpreter.

Usage: python server.py PORT TRANSPORT (streamable-http | sse | stateless-http).
Tools: typed ones (FastMCP derives input and output schemas), one that reports progress and
logs, one that asks the client for input (elicitation), one that fails.
"""

import sys

from mcp.server.fastmcp import Context, FastMCP
from mcp.types import ImageContent
from pydantic import BaseModel, Field

port, transport = int(sys.argv[1]), sys.argv[2]
server = FastMCP(
    "fastmcp-1x", port=port, stateless_http=transport == "stateless-http", log_level="WARNING"
)


class Weather(BaseModel):
    city: str
    celsius: float = Field(description="Temperature in degrees Celsius")


@server.tool(description="Add two integers.")
def add(a: int, b: int) -> int:
    return a + b


@server.tool(name="weather.lookup", annotations={"readOnlyHint": True, "title": "Weather"})
def weather(city: str) -> Weather:
    """The weather in a city, as structured content."""
    return Weather(city=city, celsius=21.5)


@server.tool()
def picture() -> ImageContent:
    """A tiny image."""
    return ImageContent(type="image", data="iVBORw0KGgo=", mimeType="image/png")


@server.tool()
async def slow_count(steps: int, ctx: Context) -> str:
    """Counts, reporting progress and logging each step."""
    for step in range(1, steps + 1):
        await ctx.report_progress(step, steps, f"step {step}")
        await ctx.info(f"counted {step}")
    return f"counted to {steps}"


class Confirmation(BaseModel):
    confirm: bool


@server.tool()
async def ask_user(ctx: Context) -> str:
    """Asks the client's user to confirm (elicitation)."""
    try:
        answer = await ctx.elicit("Really?", schema=Confirmation)
    except Exception as error:  # the client refused the request
        return f"elicitation failed: {error}"
    return f"elicitation {answer.action}"


@server.tool()
def fail(reason: str) -> str:
    """Always fails with the reason."""
    raise ValueError(reason)


server.run("sse" if transport == "sse" else "streamable-http")
