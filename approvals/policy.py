"""THE policy: what runs, what waits for a human, and what never runs, and why.

Every entry point asks here: the JSON API and the MCP endpoint (their tool lists and each
request), the queue page, the worker just before running, the admin's labels. Nothing else
decides.

This module is the seam other code builds on; its rules are being gathered here from
`integrations.models.Tool.effective_approval` and `approvals.models.request_tool_call`.
"""

from dataclasses import dataclass

from integrations.models import Tool


@dataclass(frozen=True)
class ServedTool:
    """A tool as an agent is shown it, by the JSON API (`GET /api/v1/tools`) and the MCP
    endpoint (`tools/list`) alike."""

    tool: Tool
    approval: str  # "auto" (runs on its own) or "requires_approval" (waits for a human)

    @property
    def server_name(self):
        return self.tool.server.name

    def as_json(self):
        tool = self.tool
        return {
            "server": tool.server.name,
            "name": tool.name,
            "title": tool.title,
            "description": tool.description,
            "input_schema": tool.input_schema,
            "annotations": tool.annotations,
            "approval": self.approval,
        }


def tools_for_agent(agent):
    """The tools `agent` may call, ordered by server and name; disabled tools are left out."""
    queryset = (
        Tool.objects.listed()
        .filter(server__in=agent.servers.filter(enabled=True))
        .select_related("server")
        .order_by("server__name", "name")
    )
    served = []
    for tool in queryset:
        approval = tool.effective_approval
        if approval != "blocked":
            served.append(ServedTool(tool, approval))
    return served
