"""`manage.py run` (what `make run` starts): web, worker, beat and the demo MCP server, the first
superuser, the demo agent's ready-to-paste curl, Ctrl-C."""

import collections
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from integrations.management.commands.run import Command
from integrations.models import Agent, McpServer
from tests.conftest import track

ROOT = Path(__file__).resolve().parent.parent
# `run` must start on its own embedded defaults, not on the test run's database or broker.
OWN_SERVICES = {
    "DATABASE_URL", "CELERY_BROKER_URL", "CELERY_BROKER_DIR", "CELERY_BROKER_KEY_PREFIX",
}  # fmt: skip


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def manage(env, *args, **kwargs):
    process = subprocess.Popen(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, text=True, **kwargs
    )
    return track(process)


def drain(process):
    """Keep reading what the processes print from now on (the last lines are kept for a
    failure message): the worker and beat log every task, and once the pipe's buffer is full
    they, and `run` saying "Stopping…", would block on it and never stop."""
    process.tail = collections.deque(maxlen=40)
    threading.Thread(target=process.tail.extend, args=[process.stdout], daemon=True).start()


def read_until(process, pattern, timeout=90):
    """Read the process's output until a line matches; return everything read."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if re.search(pattern, line):
            drain(process)
            return "".join(seen)
    raise AssertionError(f"never printed {pattern!r}:\n{''.join(seen)}")


def get(url, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return urllib.request.urlopen(url, timeout=5)  # noqa: S310 - a literal http URL
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def printed_curl(output):
    """The curl command as printed: its lines joined where they end in a backslash."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("curl "))
    command = []
    for line in lines[start:]:
        command.append(line.strip().removesuffix("\\"))
        if not line.endswith("\\"):
            break
    return " ".join(command)


def send_curl(command):
    """Run the printed command as a shell would; return (HTTP status, JSON body)."""
    args = shlex.split(command)
    if shutil.which("curl"):
        result = subprocess.run(
            [*args, "-w", "\n%{http_code}"], capture_output=True, text=True, timeout=60
        )
        body, _, status = result.stdout.rpartition("\n")
        return int(status), json.loads(body)
    # No curl here: send what its arguments say with urllib.
    assert args[:4] == ["curl", "-s", "-X", "POST"], args
    url, headers, data = args[4], {}, None
    rest = iter(args[5:])
    for flag in rest:
        value = next(rest)
        if flag == "-H":
            name, _, header = value.partition(":")
            headers[name] = header.strip()
        else:
            assert flag == "-d", flag
            data = value.encode()
    assert url.startswith("http://127.0.0.1:"), url
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - http URL
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def stop(process):
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        alive = [" ".join(p.cmdline()[:6]) for p in psutil.Process(process.pid).children()]
        output = "".join(getattr(process, "tail", []))
        raise AssertionError(f"run did not stop; still running: {alive}\n{output}") from None


def test_run_starts_everything_shows_the_demo_and_stops_on_ctrl_c(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in OWN_SERVICES}
    for name in ("DJANGO_SUPERUSER_PASSWORD", "TOOLGATE_DEMO", "SITE_URL"):
        env.pop(name, None)
    env.update(TOOLGATE_VAR_DIR=str(tmp_path), PORT=str(port), DEMO_MCP_PORT=str(free_port()))
    assert manage(env, "migrate", "-v0").wait(timeout=120) == 0

    # First run: the superuser's password and the demo agent's curl, shown once.
    process = manage(env, "run", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output = read_until(process, r"Press Ctrl-C")
        assert f"http://127.0.0.1:{port}/admin/" in output
        password = re.search(r"password: (\S+)", output)[1]
        assert len(password) >= 12
        assert "Note:" not in output  # the demo's tools were listed
        assert get(f"http://127.0.0.1:{port}/admin/login/").status == 200
        children = psutil.Process(process.pid).children()
        assert len(children) == 4  # web, worker, beat, demo MCP server

        command = printed_curl(output)
        assert command.startswith(f"curl -s -X POST http://127.0.0.1:{port}/api/v1/tool-calls ")
        status, call = send_curl(command)
        assert status == 201, call
        assert call["status"] == "pending_approval"
        assert (call["server"], call["tool"]) == ("demo", "refund_order")
        assert re.search(
            rf"http://127\.0\.0\.1:{port}/(approvals|admin/approvals/toolcall)/", output
        )
    finally:
        stop(process)
    assert not any(child.is_running() and child.status() != "zombie" for child in children)

    # A second run reuses the superuser and the demo: no password, no token.
    process = manage(env, "run", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output = read_until(process, r"Press Ctrl-C")
        assert "password:" not in output
        assert "Bearer" not in output
        assert Agent.TOKEN_PREFIX not in output
        assert "shown on the first run" in output
        assert len(psutil.Process(process.pid).children()) == 4
    finally:
        stop(process)

    # With the demo's port taken, everything else still starts, and the output says why. The
    # squatter takes whatever port the kernel gives it: rebinding the earlier runs' port can fail,
    # since once it is free any outgoing connection on the machine may be given it.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = str(squatter.getsockname()[1])
        process = manage(
            {**env, "DEMO_MCP_PORT": taken}, "run", stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            output = read_until(process, r"Press Ctrl-C")
            assert f"port {taken} is taken" in output
            assert len(psutil.Process(process.pid).children()) == 3  # web, worker, beat
        finally:
            stop(process)

    # TOOLGATE_DEMO=false leaves the demo out entirely.
    process = manage(
        {**env, "TOOLGATE_DEMO": "false"}, "run", stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        output = read_until(process, r"Press Ctrl-C")
        assert "demo" not in output.lower()
        assert len(psutil.Process(process.pid).children()) == 3  # web, worker, beat
    finally:
        stop(process)


def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # what a shell's `make run &` hands down


@pytest.mark.parametrize(
    "signum, started",
    [(signal.SIGTERM, None), (signal.SIGHUP, None), (signal.SIGINT, _ignore_sigint)],
    ids=["SIGTERM", "SIGHUP", "SIGINT inherited ignored"],
)
def test_run_stops_every_child_on_a_signal_not_only_on_ctrl_c(tmp_path, signum, started):
    env = {k: v for k, v in os.environ.items() if k not in OWN_SERVICES}
    for name in ("DJANGO_SUPERUSER_PASSWORD", "SITE_URL"):
        env.pop(name, None)
    env.update(TOOLGATE_VAR_DIR=str(tmp_path), PORT=str(free_port()), TOOLGATE_DEMO="false")
    assert manage(env, "migrate", "-v0").wait(timeout=120) == 0
    process = manage(
        env, "run", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=started
    )
    try:
        read_until(process, r"Press Ctrl-C")
        children = psutil.Process(process.pid).children()
        assert len(children) == 3  # web, worker, beat
        process.send_signal(signum)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            stop(process)
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not [child for child in alive if child.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.django_db
def test_the_demo_is_registered_even_when_its_server_does_not_start(settings):
    settings.DEMO_MCP_PORT = free_port()  # nothing listens there
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    demo = Command().set_up_demo(dead)

    assert "did not start" in demo["problem"]
    server = McpServer.objects.get(name="demo")
    assert server.approval_mode == "always_ask"
    assert (server.allow_private_network, server.allow_http) == (True, True)
    agent = Agent.authenticate(demo["token"])
    assert agent.name == "demo-agent"
    assert list(agent.servers.all()) == [server]
    assert "Note:" in "\n".join(Command().first_demo_lines(demo, "http://127.0.0.1:8000"))
    # Later runs leave what exists alone and show no token.
    assert Command().set_up_demo(dead)["token"] is None
    assert Agent.objects.count() == McpServer.objects.count() == 1
