"""Toolgate as an MCP server for agents: `/mcp/<server>/` and `/mcp/`, mounted in config/asgi.py.

- `app.py`: the ASGI app: routes, the agent's Bearer token, the rate limit, Origin checks,
  the SDK's Streamable HTTP session manager and SSE transport, `tools/list_changed`.
- `server.py`: the SDK's low-level `Server` with Toolgate's handlers (`tools/list`,
  `tools/call`, `logging/setLevel`, tasks).
- `calls.py`: what happens to one `tools/call`: the one request path, then running it here,
  holding the request while a human decides, or answering with a task.
- `tasks.py`: tool calls as MCP tasks, in the 2025-11-25 and the 2026-07-28 extension forms.
- `tools.py`: served tools as MCP tools, their names on `/mcp/`, calls as `CallToolResult`s.
- `batches.py`: JSON-RPC batches (2025-03-26) and malformed bodies, before the SDK sees them.
- `events.py`: each session's recent events, so a client can resume a broken stream.
"""
