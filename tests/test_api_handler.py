"""The agent API's ASGI handler (config/asgi.py, `ApiASGIHandler`): what it keeps of Django's
own handler (a client that goes away cancels its request, `request_finished` once a request),
driven with the ASGI messages uvicorn sends: the body, then `http.disconnect` when the client
goes away or once the response is complete."""

import asyncio
import json
import time

import pytest
from django.core import signals
from django.http import JsonResponse
from django.urls import re_path

from approvals.models import Status, ToolCall
from integrations.models import Agent
from tests.test_hot_path import add_demo

pytestmark = pytest.mark.django_db(transaction=True)  # the web's database thread has its own


@pytest.fixture
def finished():
    """The request_finished signals sent, as they are sent."""
    sent = []

    def receiver(**kwargs):
        sent.append(kwargs)

    signals.request_finished.connect(receiver)
    yield sent
    signals.request_finished.disconnect(receiver)


def scope(token, body, query=b"wait=10"):
    headers = [
        (b"host", b"127.0.0.1"),
        (b"authorization", f"Bearer {token}".encode()),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http",
        "method": "POST", "path": "/api/v1/tool-calls", "raw_path": b"/api/v1/tool-calls",
        "root_path": "", "query_string": query, "headers": headers,
        "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 5000),
    }  # fmt: skip


async def serve(token, arguments, *, after_body, sent=None):
    """Send one waited call of `slow` to the application; `after_body(sent)` is what `receive`
    answers once the body was read (uvicorn's answers `http.disconnect`, when the client goes
    away or the response is complete). The messages the application sent."""
    from config.asgi import application

    body = json.dumps({"server": "demo", "tool": "slow", "arguments": arguments}).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent = [] if sent is None else sent

    async def receive():
        return messages.pop() if messages else await after_body(sent)

    async def send(message):
        sent.append(message)

    await application(scope(token, body), receive, send)
    return sent


def final(call_id, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        call = ToolCall.objects.get(pk=call_id)
        if call.is_final:
            return call
        time.sleep(0.05)
    raise AssertionError(f"call {call_id} still {call.status}")


def test_an_agent_that_goes_away_cancels_its_request_but_not_the_run(loop, upstream, finished):
    """The view is cancelled (nothing is sent, the request is finished once), the call it
    started runs on and records its result (approvals/running.py)."""
    server = add_demo(upstream)
    _, token = Agent.create_with_token("bot", [server])

    async def go_away(sent):
        while not await ToolCall.objects.filter(status=Status.RUNNING).aexists():
            await asyncio.sleep(0.02)
        return {"type": "http.disconnect"}

    sent = loop.run(serve(token, {"seconds": 0.5}, after_body=go_away))
    assert sent == [] and len(finished) == 1
    call = final(ToolCall.objects.get().pk)
    assert (call.status, call.result_content[0]["text"]) == (Status.SUCCEEDED, "slept 0.5s")


def test_an_agent_that_goes_away_while_its_call_is_stored_still_has_it_run(loop, upstream):
    """The client goes away while the hop that stores the auto-approved call (`running`, for
    this request to run) is still on the database thread: the view is cancelled before it can
    start the run, and the call runs anyway, once, and records its result. It stayed
    `running`, never sent, until the sweeper made it `unknown` (a call that "may have run")."""
    import threading

    from django.db.models.signals import post_save

    server = add_demo(upstream)
    _, token = Agent.create_with_token("bot", [server])
    stored, released = asyncio.Event(), threading.Event()
    running_loop = []

    def hold_the_hop(sender, instance, created, **kwargs):
        if created:  # on the database thread, the call just inserted
            running_loop[0].call_soon_threadsafe(stored.set)
            released.wait(10)

    async def go_away(sent):
        await stored.wait()
        return {"type": "http.disconnect"}

    async def request_then_release():
        running_loop.append(asyncio.get_running_loop())
        sent = await serve(token, {"seconds": 0}, after_body=go_away)
        released.set()
        return sent

    post_save.connect(hold_the_hop, sender=ToolCall)
    try:
        sent = loop.run(request_then_release())
    finally:
        released.set()
        post_save.disconnect(hold_the_hop, sender=ToolCall)
    assert sent == []
    call = final(ToolCall.objects.get().pk)
    assert (call.status, call.result_content[0]["text"]) == (Status.SUCCEEDED, "slept 0.0s")
    assert upstream.recording.count("tools/call") == 1


def test_a_request_cancelled_by_the_server_leaves_no_view_behind(loop, upstream):
    """The view runs in the request's own task: when the server cancels it (uvicorn, at a
    shut-down that timed out), nothing answers later on that connection (Django's handler ran
    the view in a second task, which went on and sent its response), and the call still
    runs."""
    server = add_demo(upstream)
    _, token = Agent.create_with_token("bot", [server])
    sent = []

    async def cancel_while_running():
        async def wait_for_the_server(_):
            await asyncio.Event().wait()

        request = asyncio.ensure_future(
            serve(token, {"seconds": 0.3}, after_body=wait_for_the_server, sent=sent)
        )
        while not await ToolCall.objects.filter(status=Status.RUNNING).aexists():
            await asyncio.sleep(0.02)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        await asyncio.sleep(0.6)  # past the call's end

    loop.run(cancel_while_running())
    assert sent == []
    assert final(ToolCall.objects.get().pk).status == Status.SUCCEEDED


def test_a_response_sent_in_full_is_closed_once(loop, upstream, finished):
    """uvicorn answers `http.disconnect` as soon as the response is complete: the request is
    finished once, by the response's close, and nothing else is sent."""
    server = add_demo(upstream)
    _, token = Agent.create_with_token("bot", [server])

    async def disconnect_once_complete(sent):
        while not (sent and sent[-1]["type"] == "http.response.body"):
            await asyncio.sleep(0.01)
        return {"type": "http.disconnect"}

    sent = loop.run(serve(token, {"seconds": 0}, after_body=disconnect_once_complete))
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 201 and json.loads(sent[1]["body"])["status"] == "succeeded"
    assert len(finished) == 1


def test_a_message_other_than_a_disconnect_after_the_body_is_an_error(loop, upstream, finished):
    """As in Django's handler: the ASGI server broke the protocol, which is raised."""
    server = add_demo(upstream)
    _, token = Agent.create_with_token("bot", [server])

    async def another_body(sent):
        return {"type": "http.request", "body": b"", "more_body": False}

    with pytest.raises(AssertionError, match="Invalid ASGI message after request body"):
        loop.run(serve(token, {"seconds": 0.5}, after_body=another_body))


def test_the_body_is_read_into_memory_once(loop, upstream, monkeypatch):
    """`BodyLimit` has the whole body, bounded, before the handler reads it: the handler reads
    it into memory (Django's reader spools it into a temporary file, for a body of any size),
    and a body that came in one message is passed on as it came, not copied."""
    import tempfile

    from config.asgi import BodyLimit

    server = add_demo(upstream)
    _, token = Agent.create_with_token("bot", [server])
    monkeypatch.setattr(tempfile, "SpooledTemporaryFile", None)  # calling it fails

    async def done(sent):
        await asyncio.Event().wait()

    sent = loop.run(serve(token, {"seconds": 0}, after_body=done))
    assert sent[0]["status"] == 201

    body = json.dumps({"server": "demo", "tool": "echo"}).encode()
    passed = []

    async def app(scope, receive, send):
        passed.append((await receive())["body"])

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    loop.run(BodyLimit(app)(scope(token, body), receive, None))
    assert passed[0] is body


async def get(path):
    """GET `path` from the application; its status and JSON."""
    from config.asgi import application

    messages, sent, complete = [{"type": "http.request", "body": b""}], [], asyncio.Event()

    async def receive():
        if messages:
            return messages.pop()
        await complete.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if message["type"] == "http.response.body":
            complete.set()

    request = {**scope("", b""), "method": "GET", "path": path, "raw_path": path.encode()}
    await application(request, receive, send)
    return sent[0]["status"], json.loads(sent[1]["body"])


def answered_by_this_urlconf(request):
    return JsonResponse({"here": request.path})


urlpatterns = [re_path(r"^api/", answered_by_this_urlconf)]


def test_a_path_is_matched_against_the_url_patterns_once(loop, monkeypatch, settings):
    """The match is remembered per path (`ApiASGIHandler.resolve_request`), for the URLconf in
    force: another ROOT_URLCONF is another resolver, whose matches are its own."""
    from django.urls import get_resolver
    from django.urls.resolvers import URLResolver

    walks = []
    resolve = URLResolver.resolve

    def counted(self, path):
        if self is get_resolver():
            walks.append(path)
        return resolve(self, path)

    monkeypatch.setattr(URLResolver, "resolve", counted)
    path = f"/api/v1/tools-{time.monotonic_ns()}"
    settings.ROOT_URLCONF = __name__
    for _ in range(3):
        assert loop.run(get(path)) == (200, {"here": path})
    assert walks == [path]
    settings.ROOT_URLCONF = "config.urls"
    assert loop.run(get(path))[1]["error"]["code"] == "not_found"


def test_a_long_made_up_path_is_answered_but_its_match_not_kept(loop):
    """Anyone can send paths under /api/ (the API's 404 matches them all): a long one is not
    remembered, so made-up paths can't fill the cache with megabytes."""
    from config.asgi import CACHED_PATH_CHARS, _resolve

    path = "/api/v1/" + "x" * CACHED_PATH_CHARS + str(time.monotonic_ns())
    before = _resolve.cache_info().currsize
    assert loop.run(get(path))[1]["error"]["code"] == "not_found"
    assert _resolve.cache_info().currsize == before
    short = f"/api/v1/nope-{time.monotonic_ns()}"
    assert loop.run(get(short))[1]["error"]["code"] == "not_found"
    assert _resolve.cache_info().currsize == min(before + 1, 1024)
