// The TypeScript MCP SDK v2 client (@modelcontextprotocol/client), driven by
// tests/test_mcp_compat_node.py. Usage: node client.mjs SPEC-JSON, where SPEC is
// {"url", "token", "transport": "http" | "sse", "mode": "legacy" | "auto" | "2026-07-28", "steps": [...]}
// and a step is "list", "ping", {"call": NAME, "arguments": {...}}, {"task": NAME, "arguments": {...}}
// (through @modelcontextprotocol/ext-tasks, 2025-11-25 tasks), {"level": LEVEL} or
// {"wait_list_changed": SECONDS}. Prints one JSON line per event; exits 1 with {"error": …}.
import { Client, SSEClientTransport, StreamableHTTPClientTransport } from "@modelcontextprotocol/client";
import { createTaskSessionFromClient, resultFromTaskOutcome } from "@modelcontextprotocol/ext-tasks/client";

const spec = JSON.parse(process.argv[2]);
const headers = { Authorization: `Bearer ${spec.token}` };
const out = (event) => console.log(JSON.stringify(event));

const transport =
  spec.transport === "sse"
    ? new SSEClientTransport(new URL(spec.url), { requestInit: { headers }, headers })
    : new StreamableHTTPClientTransport(new URL(spec.url), { requestInit: { headers } });
const mode = spec.mode === "2026-07-28" ? { pin: "2026-07-28" } : spec.mode || "legacy";
const client = new Client({ name: "toolgate-test-ts-v2", version: "1.0.0" }, { versionNegotiation: { mode } });
let changed = null;
client.setNotificationHandler?.("notifications/tools/list_changed", () => {
  out({ notification: "tools/list_changed" });
  changed?.();
});

try {
  await client.connect(transport);
  out({ connected: { protocolVersion: client.getNegotiatedProtocolVersion?.() ?? null, server: client.getServerVersion() } });
  for (const step of spec.steps) {
    if (step === "list") out({ tools: (await client.listTools()).tools });
    else if (step === "ping") out({ ping: await client.ping() });
    else if (step.level) out({ level: await client.setLoggingLevel(step.level) });
    else if (step.wait_list_changed) {
      const heard = new Promise((resolve) => (changed = resolve));
      out({ waiting: "tools/list_changed" });
      await Promise.race([heard, new Promise((_, reject) => setTimeout(() => reject(new Error("no list_changed")), step.wait_list_changed * 1000))]);
    } else if (step.task) {
      const tasks = createTaskSessionFromClient(client, { endpointId: "toolgate" });
      try {
        const execution = await tasks.callTool(step.task, step.arguments ?? {}, { task: { preference: "prefer" } });
        out({ execution: { kind: execution.kind, handle: JSON.parse(JSON.stringify(execution.handle ?? null)) } });
        const { outcome } = await execution.settle();
        out({ outcome: JSON.parse(JSON.stringify({ ...outcome, result: undefined })) });
        out({ result: resultFromTaskOutcome(outcome) });
      } finally {
        await tasks.close();
      }
    } else if (step.call) {
      const result = await client.callTool(
        { name: step.call, arguments: step.arguments ?? {} },
        { onprogress: (progress) => out({ progress }), timeout: 120000 },
      );
      out({ result });
    }
  }
  await client.close();
} catch (error) {
  out({ error: String(error), code: error?.code ?? null });
  process.exit(1);
}
