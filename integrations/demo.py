"""The demo MCP server `make run` starts beside Toolgate, so there is something to try at once.

A pretend shop's order desk with two tools, one harmless and one that should need a human:

- ``lookup_order(order_id)``: read-only and idempotent; returns made-up order details.
- ``refund_order(order_id, amount, reason)``: destructive; says it refunded. Nothing happens.

Run it alone with ``python -m integrations.demo --port 8001``: Streamable HTTP at
``http://127.0.0.1:8001/mcp``, listening on loopback only. It needs no Django settings.
"""

import argparse
import hashlib
from typing import Annotated

import mcp_types
import uvicorn
from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

HOST = "127.0.0.1"  # never anything else: the demo has no authentication
PATH = "/mcp"

_PRODUCTS = [
    ("Blue mug", 12.50),
    ("Desk lamp", 39.90),
    ("Wool socks (3 pairs)", 18.00),
    ("Notebook, dotted", 7.25),
    ("Headphones", 89.00),
]
_STATUSES = ["processing", "shipped", "delivered"]

OrderId = Annotated[str, Field(description="The order number, e.g. A-1001.")]


def _order(order_id):
    """The same made-up order every time for one id."""
    seed = int.from_bytes(hashlib.sha256(order_id.encode()).digest()[:8], "big")
    product, price = _PRODUCTS[seed % len(_PRODUCTS)]
    quantity = seed // 7 % 3 + 1
    return {
        "order_id": order_id,
        "status": _STATUSES[seed // 11 % len(_STATUSES)],
        "customer": "Demo Customer <customer@example.com>",
        "items": [{"product": product, "quantity": quantity, "unit_price": price}],
        "total": round(price * quantity, 2),
        "currency": "EUR",
    }


def demo_server():
    server = MCPServer(
        "toolgate-demo",
        instructions="A pretend shop's order desk, bundled with Toolgate for trying it out.",
        log_level="WARNING",
    )

    @server.tool(
        title="Look up an order",
        annotations=mcp_types.ToolAnnotations(
            read_only_hint=True, idempotent_hint=True, open_world_hint=False
        ),
    )
    def lookup_order(order_id: OrderId) -> dict:
        """Show an order's status, items and total (made-up data)."""
        return _order(order_id)

    @server.tool(
        title="Refund an order",
        annotations=mcp_types.ToolAnnotations(
            destructive_hint=True, idempotent_hint=False, open_world_hint=False
        ),
    )
    def refund_order(
        order_id: OrderId,
        amount: Annotated[float, Field(description="How much to refund, in EUR.")],
        reason: Annotated[str, Field(description="Why, in a few words.")],
    ) -> str:
        """Refund part or all of an order to the customer (a demo: no money moves)."""
        if amount <= 0:
            raise ToolError("amount must be greater than 0")
        return (
            f"Refunded {amount:.2f} EUR on order {order_id} ({reason}). Demo only: no money moved."
        )

    return server


def main(argv=None):
    parser = argparse.ArgumentParser(description="Toolgate's demo MCP server (loopback only).")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    app = demo_server().streamable_http_app(streamable_http_path=PATH)
    uvicorn.run(app, host=HOST, port=args.port, log_level="warning", timeout_graceful_shutdown=2)


if __name__ == "__main__":
    main()
