// The TypeScript MCP SDK client, driven by tests/test_mcp_endpoint_node.py.
// Usage: node client.mjs URL TOKEN TRANSPORT(http|sse) ACTION [TOOL] [ARGUMENTS-JSON]
// ACTION: list | call | task. Prints one JSON line per event; exits 1 with {"error": …}.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { SSEClientTransport } from "@modelcontextprotocol/sdk/client/sse.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [url, token, kind, action, tool, rawArguments] = process.argv.slice(2);
const headers = { Authorization: `Bearer ${token}` };
const out = (event) => console.log(JSON.stringify(event));

const transport =
  kind === "sse"
    ? new SSEClientTransport(new URL(url), {
        requestInit: { headers },
        eventSourceInit: {
          fetch: (input, init) => fetch(input, { ...init, headers: { ...init?.headers, ...headers } }),
        },
      })
    : new StreamableHTTPClientTransport(new URL(url), { requestInit: { headers } });
const client = new Client({ name: "node-test-client", version: "1.0.0" });

try {
  await client.connect(transport);
  out({ protocolVersion: transport.protocolVersion ?? null, server: client.getServerVersion() });
  const { tools } = await client.listTools();
  if (action === "list") out({ tools });
  const args = JSON.parse(rawArguments || "{}");
  if (action === "call") {
    const result = await client.callTool({ name: tool, arguments: args }, undefined, {
      onprogress: (progress) => out({ progress }),
      timeout: 120000,
    });
    out({ result });
  }
  if (action === "task") {
    const stream = client.experimental.tasks.callToolStream({ name: tool, arguments: args });
    for await (const message of stream) out({ [message.type]: message.task ?? message.result ?? message.error });
  }
  await client.close();
} catch (error) {
  out({ error: String(error), code: error?.code ?? null });
  process.exit(1);
}
