"""`manage.py run` (what `make run` starts): web, worker and beat, first superuser, Ctrl-C."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def manage(env, *args, **kwargs):
    return subprocess.Popen(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, text=True, **kwargs
    )


def read_until(process, pattern, timeout=90):
    """Read the process's output until a line matches; return everything read."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if re.search(pattern, line):
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


def test_run_starts_everything_and_stops_on_ctrl_c(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "CELERY_BROKER_URL"}}
    env.pop("DJANGO_SUPERUSER_PASSWORD", None)
    env.update(TOOLGATE_VAR_DIR=str(tmp_path), PORT=str(port))
    assert manage(env, "migrate", "-v0").wait(timeout=120) == 0

    process = manage(env, "run", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output = read_until(process, r"password: \S+")
        assert f"http://127.0.0.1:{port}/admin/" in output
        password = re.search(r"password: (\S+)", output)[1]
        assert len(password) >= 12
        assert get(f"http://127.0.0.1:{port}/admin/login/").status == 200
        children = psutil.Process(process.pid).children()
        assert len(children) == 3  # web, worker, beat
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) is not None
    assert not any(child.is_running() and child.status() != "zombie" for child in children)

    # A second run reuses the superuser instead of printing a new password.
    process = manage(env, "run", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output = read_until(process, r"Press Ctrl-C")
        assert "password:" not in output
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
