"""Real receivers of notifications on loopback: an SMTP server (aiosmtpd) and an HTTP server
standing in for Slack and webhook endpoints. Both keep what they received for the test to read.
A pytest plugin (see conftest): the fixtures `smtp_server`, `mailbox` and `receiver`.
"""

import email
import email.policy
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from aiosmtpd.controller import Controller


@dataclass
class Received:
    path: str
    headers: dict
    body: bytes


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        receiver = self.server.receiver
        status, reply, headers = receiver.next_answer(self.path)
        receiver.requests.append(Received(self.path, dict(self.headers.items()), body))
        if receiver.trickle:
            self._trickle(status, *receiver.trickle)
        else:
            self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def _trickle(self, status, count, delay):
        """The status line and a header whose `count` bytes are sent `delay` seconds apart:
        every read of the client gets a byte in time, and the reply takes count * delay."""
        self.wfile.write(f"{self.protocol_version} {status} Slow\r\nX-Slow: ".encode())
        for _ in range(count):
            if self.server.receiver.closed.wait(delay):
                break
            self.wfile.write(b"a")
        self.wfile.write(b"\r\n")

    def log_message(self, format, *args):
        pass


class HttpReceiver:
    """POSTs to any path are recorded; `answers` are given in order (then 200 "ok").

    An answer is a status, or (status, body), or (status, body, headers); a body may contain
    "{path}", replaced by the request's path (a hostile receiver echoing the secret URL).
    With `trickle=(count, delay)`, every answer is preceded by `count` bytes sent `delay`
    seconds apart (a receiver that never lets a read time out).
    """

    def __init__(self, answers=(), trickle=None):
        self.answers = list(answers)
        self.trickle = trickle
        self.closed = threading.Event()
        self.requests = []
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.receiver = self
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def origin(self):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path="/hook"):
        return self.origin + path

    def next_answer(self, path):
        with self._lock:
            answer = self.answers.pop(0) if self.answers else 200
        if isinstance(answer, int):
            answer = (answer, "ok")
        status, body, headers = (*answer, {})[:3]
        return status, body.replace("{path}", path).encode(), headers

    def close(self):
        self.closed.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class _Collect:
    def __init__(self, server):
        self.server = server

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.server.refuse_with and self.server.refusals_left > 0:
            self.server.refusals_left -= 1
            return self.server.refuse_with
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.server.messages.append(message)
        return "250 Message accepted"


@dataclass
class SmtpServer:
    """aiosmtpd on 127.0.0.1. With `refuse_with` (e.g. "451 4.3.0 Try later") it refuses the
    next `refusals_left` recipients."""

    messages: list = field(default_factory=list)
    refuse_with: str = ""
    refusals_left: int = 0
    port: int = 0
    controller: Controller = None

    def start(self):
        self.port = free_port()
        self.controller = Controller(_Collect(self), hostname="127.0.0.1", port=self.port)
        self.controller.start()
        return self

    @property
    def url(self):
        return f"smtp://127.0.0.1:{self.port}"

    def stop(self):
        self.controller.stop()


@pytest.fixture(scope="session")
def smtp_server():
    """A real SMTP server (aiosmtpd) on loopback; the session's worker sends its mail there."""
    server = SmtpServer().start()
    yield server
    server.stop()


@pytest.fixture
def mailbox(smtp_server):
    """The session's SMTP server, emptied for this test."""
    smtp_server.messages.clear()
    smtp_server.refuse_with, smtp_server.refusals_left = "", 0
    yield smtp_server
    smtp_server.refuse_with, smtp_server.refusals_left = "", 0


@pytest.fixture
def receiver():
    """An HTTP receiver answering 200 to everything."""
    running = HttpReceiver()
    yield running
    running.close()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
