"""What the SDK's handshake-era transport doesn't do with a POSTed body, done as the spec says.

- JSON-RPC batches (an array of messages) are part of protocol version 2025-03-26 only: a
  server of that version MUST accept them (basic/transports "Sending Messages to the
  Server"); 2025-06-18 removed them. The SDK's transport takes one message per POST, so a
  batch of a session that speaks 2025-03-26 (or 2024-11-05: no `MCP-Protocol-Version`
  header, which 2025-06-18 made mandatory) is split here: each message goes to the SDK as a
  request of its own, concurrently, on the same session, and the responses come back
  together as one JSON array (`application/json`), in the order of the requests;
  notifications and responses in the batch get none (202 if that is all it held). Progress
  notifications of a batched call are not passed on: the answer is one JSON body. A batch
  holding `initialize`, an empty one, and a batch on a later version are refused with
  `-32600` (Invalid Request), as the 2026-07-28 path of the SDK refuses them.
- A body that is JSON but no JSON-RPC message is answered `-32600` too, as JSON-RPC 2.0 says
  (the SDK's handshake transport says `-32602`).

Everything else reaches the SDK untouched: the body is read (up to the SDK's own size limit,
past which the SDK answers 413) and replayed to it.
"""

import json

import anyio
from mcp.server.streamable_http import MCP_PROTOCOL_VERSION_HEADER
from mcp.server.transport_security import DEFAULT_MAX_REQUEST_BODY_SIZE
from mcp_types import INTERNAL_ERROR, INVALID_REQUEST, jsonrpc_message_adapter
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from pydantic import ValidationError

BATCH_VERSIONS = (None, "2024-11-05", "2025-03-26")  # None: no header, so 2025-03-26 or older
UNREAD = object()  # a body left to the SDK: too large, or not JSON


async def serve(handle, scope, receive, send, parsed=UNREAD):
    """Serve one Streamable HTTP request with `handle` (the SDK's); those of the 2026-07-28
    era (the SDK checks their bodies itself) and all but POSTs go straight to it. `parsed`:
    the body, already read whole and parsed by the caller (`UNREAD`: read and parse it here)."""
    if scope["method"] != "POST" or _version(scope) not in (None, *HANDSHAKE_PROTOCOL_VERSIONS):
        return await handle(scope, receive, send)
    if parsed is not UNREAD:
        message = parsed
    else:
        body, more, receive = await _read(receive)
        try:
            message = json.loads(body) if not more else UNREAD
        except ValueError:
            message = UNREAD  # not JSON: the SDK answers with its parse error
    if isinstance(message, list):
        return await _batch(handle, scope, receive, send, message)
    if message is not UNREAD and not _valid(message):
        request_id = message.get("id") if isinstance(message, dict) else None
        request_id = request_id if isinstance(request_id, str | int) else None
        return await _refuse(send, "Invalid Request: not a JSON-RPC message.", request_id)
    await handle(scope, receive, send)


async def _read(receive):
    """The body as far as the SDK would take it, whether more follows, and a `receive` that
    replays it before passing on what comes next."""
    chunks, size, more = [], 0, True
    while more and size <= DEFAULT_MAX_REQUEST_BODY_SIZE:
        message = await receive()
        if message["type"] != "http.request":
            more = False
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        more = message.get("more_body", False)
    body, replayed = b"".join(chunks), []

    async def replay():
        if not replayed:
            replayed.append(True)
            return {"type": "http.request", "body": body, "more_body": more}
        return await receive()

    return body, more, replay


def _valid(message):
    try:
        jsonrpc_message_adapter.validate_python(message, by_name=False)
    except ValidationError:
        return False
    return True


def _version(scope):
    header = MCP_PROTOCOL_VERSION_HEADER.encode("ascii")
    return next((v.decode("latin-1") for k, v in scope["headers"] if k == header), None)


async def _batch(handle, scope, receive, send, messages):
    version = _version(scope)
    if version not in BATCH_VERSIONS:
        return await _refuse(
            send, f"Invalid Request: protocol version {version} has no JSON-RPC batches; "
            "send one message per request.",
        )  # fmt: skip
    if not messages:
        return await _refuse(send, "Invalid Request: an empty batch.")
    if any(isinstance(m, dict) and m.get("method") == "initialize" for m in messages):
        return await _refuse(send, "Invalid Request: initialize must not be part of a batch.")
    answers = [None] * len(messages)
    disconnected = anyio.Event()
    async with anyio.create_task_group() as group:
        group.start_soon(_watch_disconnect, receive, disconnected)
        async with anyio.create_task_group() as requests:
            for index, message in enumerate(messages):
                requests.start_soon(_one, handle, scope, message, disconnected, answers, index)
        group.cancel_scope.cancel()
    await _answer(send, messages, answers)


async def _watch_disconnect(receive, disconnected):
    while (await receive())["type"] != "http.disconnect":
        pass
    disconnected.set()


async def _one(handle, scope, message, disconnected, answers, index):
    """One message of the batch through the SDK; its (HTTP status, JSON-RPC messages)."""
    body = json.dumps(message).encode()
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    sent = []

    async def receive():
        if not sent:
            sent.append(True)
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    status, chunks = [], []

    async def capture(event):
        if event["type"] == "http.response.start":
            status.append(event["status"])
        elif event["type"] == "http.response.body":
            chunks.append(event.get("body", b""))

    await handle({**scope, "headers": headers}, receive, capture)
    answers[index] = (status[0] if status else 500, _messages(b"".join(chunks)))


def _messages(raw):
    """The JSON-RPC messages of an SDK response body: JSON, or the `data:` of an SSE stream."""
    text = raw.decode("utf-8", "replace").strip()
    if not text:
        return []
    if text.startswith("{"):
        return [json.loads(text)]
    found = []
    for line in text.splitlines():
        if line.startswith("data:") and line[5:].strip():
            found.append(json.loads(line[5:]))
    return found


async def _answer(send, messages, answers):
    """One JSON array of the responses to the batch's requests, in their order."""
    responses = []
    for message, (status, replies) in zip(messages, answers, strict=True):
        request_id = message.get("id") if isinstance(message, dict) else None
        is_request = isinstance(message, dict) and "method" in message and "id" in message
        if not is_request and status < 400:
            continue  # a notification or a response: nothing to answer
        reply = next((r for r in replies if "id" in r and ("result" in r or "error" in r)), None)
        if reply is None:
            reply = _error(request_id, INTERNAL_ERROR, f"No answer (HTTP {status}).")
        elif reply.get("id") is None and status >= 400:
            reply = {**reply, "id": request_id}  # a transport-level refusal of this message
        responses.append(reply)
    if not responses:
        await send({"type": "http.response.start", "status": 202, "headers": []})
        return await send({"type": "http.response.body", "body": b""})
    if all(status == 404 for status, _ in answers):  # the session is gone: say so as the SDK does
        return await _json(send, 404, responses[0])
    await _json(send, 200, responses)


async def _refuse(send, message, request_id=None):
    await _json(send, 400, _error(request_id, INVALID_REQUEST, message))


def _error(request_id, code, message):
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}


async def _json(send, status, payload):
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
