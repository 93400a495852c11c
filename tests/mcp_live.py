"""A live Toolgate for MCP clients: `config.asgi.application` served by uvicorn on 127.0.0.1
in a thread of the test process, on the test database (tests using it need
`django_db(transaction=True)`: the server's thread only sees committed rows)."""

import contextlib

import httpx2
import pytest
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from tests.mcp_servers import start


@pytest.fixture
def toolgate(transactional_db, settings):
    """Toolgate's ASGI app, listening; `.base_url` is where an agent points its client."""
    settings.ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
    from config.asgi import application

    with start(application) as running:
        yield running


def http_transport(url, token, *, headers=None, stack):
    """A Streamable HTTP transport for `mcp.Client` that sends the agent's token."""
    client = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}", **(headers or {})})
    stack.push_async_callback(client.aclose)
    return streamable_http_client(url, http_client=client)


def sse_transport(url, token):
    return sse_client(url, headers={"Authorization": f"Bearer {token}"})


@contextlib.asynccontextmanager
async def exit_stack():
    async with contextlib.AsyncExitStack() as stack:
        yield stack
