"""The MCP endpoint with LangChain's MCP adapters (`langchain-mcp-adapters`) as the agent, in a
throw-away venv (tests/mcp_langchain/, tests/thirdparty.py)."""

import json
from pathlib import Path

import pytest

from integrations.models import Agent
from tests.mcp_live import add_server, approve_when_pending
from tests.mcp_servers import demo_server
from tests.thirdparty import events_of, python_venv, start

pytestmark = pytest.mark.django_db(transaction=True)
HERE = Path(__file__).parent / "mcp_langchain"


@pytest.fixture(scope="session")
def langchain():
    return python_venv(HERE / "requirements.txt")


@pytest.fixture
def demo(mcp_factory):
    return add_server("demo", mcp_factory(demo_server()).url)


@pytest.fixture
def token(demo):
    return Agent.create_with_token("lc-bot", servers=[demo])[1]


def agent(langchain, url, token, tool, arguments, transport="streamable_http"):
    spec = {"url": url, "token": token, "transport": transport, "tool": tool,
            "arguments": arguments}  # fmt: skip
    return start([langchain, str(HERE / "agent.py"), json.dumps(spec)])


def outcome(events):
    return next(event for event in events if {"content", "tool_error", "error"} & set(event))


@pytest.mark.parametrize("transport", ["streamable_http", "sse"])
def test_langchain_loads_the_tools_and_calls_one(langchain, toolgate, token, transport):
    url = f"{toolgate.base_url}/mcp/" + ("sse" if transport == "sse" else "")
    events = events_of(agent(langchain, url, token, "demo__add", {"a": 2, "b": 40}, transport))
    assert "demo__echo" in {tool["name"] for tool in events[0]["tools"]}
    assert [block["text"] for block in outcome(events)["content"]] == ["42"]


def test_a_denied_call_tells_the_model_the_note(langchain, toolgate, token, demo):
    demo.approval_mode = "always_ask"
    demo.save()
    process = agent(langchain, f"{toolgate.base_url}/mcp/demo/", token, "delete_file",
                    {"path": "/etc"})  # fmt: skip
    approve_when_pending("deny", "not today")
    # The adapters hand an `isError` result's text to the model as the tool's output.
    content = outcome(events_of(process))["content"]
    assert len(content) == 1
    assert content[0]["text"].startswith("Denied by alice: not today. The tool was not run.")
