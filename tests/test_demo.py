"""The demo MCP server `make run` starts (integrations/demo.py), over a real connection."""

import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from integrations import mcp_client
from integrations.demo import demo_server
from integrations.management.commands.run import wait_for_port
from integrations.mcp_client import Endpoint
from tests.conftest import track
from tests.mcp_servers import start

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo():
    with start(demo_server()) as running:
        yield running


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_it_offers_a_read_only_tool_and_a_destructive_one(demo):
    listing = mcp_client.list_tools(Endpoint(demo.url, allow_private_network=True))
    tools = {tool["name"]: tool for tool in listing.tools}
    assert set(tools) == {"lookup_order", "refund_order"}

    lookup = tools["lookup_order"]["annotations"]
    assert lookup["readOnlyHint"] is True
    assert lookup["idempotentHint"] is True
    assert lookup.get("destructiveHint") is not True

    refund = tools["refund_order"]
    assert refund["annotations"]["destructiveHint"] is True
    assert refund["annotations"].get("readOnlyHint") is not True
    schema = refund["inputSchema"]
    assert set(schema["required"]) == {"order_id", "amount", "reason"}
    assert schema["properties"]["amount"]["type"] == "number"


def test_its_tools_answer_with_made_up_data(demo):
    endpoint = Endpoint(demo.url, allow_private_network=True)
    found = mcp_client.call_tool(endpoint, "lookup_order", {"order_id": "A-1001"})
    again = mcp_client.call_tool(endpoint, "lookup_order", {"order_id": "A-1001"})
    assert not found.is_error
    assert found.content == again.content  # the same made-up order every time
    assert "A-1001" in found.content[0]["text"]

    refund = mcp_client.call_tool(
        endpoint, "refund_order", {"order_id": "A-1001", "amount": 25, "reason": "damaged"}
    )
    assert not refund.is_error
    assert "Refunded 25.00 EUR on order A-1001" in refund.content[0]["text"]

    refused = mcp_client.call_tool(
        endpoint, "refund_order", {"order_id": "A-1001", "amount": 0, "reason": "none"}
    )
    assert refused.is_error


def test_it_runs_as_a_module_on_loopback_only():
    port = free_port()
    process = track(
        subprocess.Popen([sys.executable, "-m", "integrations.demo", "--port", str(port)], cwd=ROOT)
    )
    try:
        assert wait_for_port(port, process)
        listening = [
            conn.laddr
            for conn in psutil.Process(process.pid).net_connections("tcp")
            if conn.status == "LISTEN"
        ]
        assert [address.ip for address in listening] == ["127.0.0.1"]
        url = f"http://127.0.0.1:{port}/mcp"
        listing = mcp_client.list_tools(Endpoint(url, allow_private_network=True))
        assert len(listing.tools) == 2
    finally:
        process.terminate()
        process.wait(timeout=10)
