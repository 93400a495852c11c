"""`manage.py run`: the whole app on one machine (what `make run` starts).

Starts the web server (uvicorn, ASGI), a Celery worker, Celery beat and the bundled demo MCP
server (`integrations/demo.py`, on loopback) as child processes, stops all of them on Ctrl-C
(or SIGTERM, SIGHUP), and stops the rest if one of them dies (the demo server excepted:
Toolgate runs on without it).

On first run with an empty database it creates the superuser `admin` and prints its password
once. On the first run with the demo (`TOOLGATE_DEMO`, on by default in development) it also
registers the demo server as "demo" (Always Ask), lists its tools, creates the agent
"demo-agent" and prints, once, a `curl` that asks for a refund as that agent: the call then
waits for a human at the approval queue. Later runs reuse both.
"""

import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand
from django.db import transaction

from integrations.models import Agent, ApprovalMode, McpServer, Transport

DEMO_SERVER = "demo"
DEMO_AGENT = "demo-agent"
DEMO_CALL = {
    "server": DEMO_SERVER,
    "tool": "refund_order",
    "arguments": {"order_id": "A-1001", "amount": 25.0, "reason": "arrived damaged"},
}
OPTIONAL = {"demo"}  # processes Toolgate runs on without


class Command(BaseCommand):
    help = "Run the web server, a Celery worker, Celery beat and the demo MCP server together."
    demo_port_taken = False

    def handle(self, *args, **options):
        call_command("collectstatic", interactive=False, verbosity=0)
        password = self.create_first_superuser()
        processes = {}
        stop_on_signals()
        try:
            self.start_processes(processes)
            demo = self.set_up_demo(processes["demo"]) if "demo" in processes else None
            wait_for_port(settings.PORT, processes["web"])
            if processes["web"].poll() is None:  # else supervise() says that it exited
                self.announce(password, demo, processes)
            self.supervise(processes)
        except KeyboardInterrupt:
            self.stdout.write("\nStopping…")
        finally:
            self.stop(processes)

    def create_first_superuser(self):
        User = get_user_model()
        if User.objects.exists():
            return None
        password = os.environ.get("DJANGO_SUPERUSER_PASSWORD") or secrets.token_urlsafe(12)
        User.objects.create_superuser("admin", email="", password=password)
        return password

    def start_processes(self, processes):
        """Start the children into `processes` one by one, so that a stop that comes while
        they start finds every one already started."""
        python = sys.executable
        celery = [python, "-m", "celery", "-A", "config", "--quiet"]  # no banners
        commands = {
            "web": [
                python, "-m", "uvicorn", "config.asgi:application",
                "--host", "127.0.0.1", "--port", str(settings.PORT), "--log-level", "warning",
            ],
            "worker": [*celery, "worker", "--loglevel", "INFO", "--concurrency", "2"],
            "beat": [
                *celery, "beat", "--loglevel", "INFO",
                "--schedule", settings.CELERY_BEAT_SCHEDULE_FILENAME,
            ],
        }  # fmt: skip
        self.demo_port_taken = settings.TOOLGATE_DEMO and not port_is_free(settings.DEMO_MCP_PORT)
        if settings.TOOLGATE_DEMO and not self.demo_port_taken:
            commands["demo"] = [
                python, "-m", "integrations.demo", "--port", str(settings.DEMO_MCP_PORT)
            ]  # fmt: skip
        for name, command in commands.items():
            processes[name] = subprocess.Popen(command)

    # The demo --------------------------------------------------------------------------------

    def set_up_demo(self, process):
        """Register the demo server and agent on the first run. Returns what to announce."""
        url = f"http://127.0.0.1:{settings.DEMO_MCP_PORT}/mcp"
        if (
            McpServer.objects.filter(name=DEMO_SERVER).exists()
            or Agent.objects.filter(name=DEMO_AGENT).exists()
        ):
            return {"url": url, "token": None, "problem": None}
        with transaction.atomic():
            server = McpServer.objects.create(
                name=DEMO_SERVER,
                description="The demo MCP server bundled with Toolgate (made-up orders).",
                url=url,
                transport=Transport.STREAMABLE_HTTP,
                approval_mode=ApprovalMode.ALWAYS_ASK,
                allow_private_network=True,
                allow_http=True,
            )
            _, token = Agent.create_with_token(
                DEMO_AGENT, [server], description="Try-it-out agent for the demo server."
            )
        return {"url": url, "token": token, "problem": self.sync_demo(server, process)}

    def sync_demo(self, server, process):
        """List the demo server's tools once it listens; a problem is returned, not raised."""
        if not wait_for_port(settings.DEMO_MCP_PORT, process):
            return f"the demo server did not start on port {settings.DEMO_MCP_PORT}"
        try:
            result = server.sync_tools()
        except Exception as exc:
            return f"listing its tools failed: {exc}"
        return None if result.ok else f"listing its tools failed: {result.error}"

    # Output ----------------------------------------------------------------------------------

    def announce(self, password, demo, processes):
        site = settings.SITE_URL
        lines = ["", f"Toolgate is running: log in at {site}/admin/"]
        if password and not os.environ.get("DJANGO_SUPERUSER_PASSWORD"):
            lines.append(f"  user: admin   password: {password}   (shown once; change it)")
        elif password:
            lines.append("  user: admin   password: $DJANGO_SUPERUSER_PASSWORD")
        if demo and demo["token"]:
            lines += self.first_demo_lines(demo, site)
        elif demo:
            lines += [
                "",
                f'Demo MCP server: {demo["url"]}, used by the agent "{DEMO_AGENT}"',
                "(its token was shown on the first run; rotate it in the admin under Agents).",
            ]
        if self.demo_port_taken:
            lines += [
                "",
                f"The demo MCP server is off: port {settings.DEMO_MCP_PORT} is taken "
                "(set DEMO_MCP_PORT, or TOOLGATE_DEMO=false).",
            ]
        names = {
            "web": "web server",
            "worker": "worker",
            "beat": "scheduler",
            "demo": "demo server",
        }
        stopped = [names[name] for name in processes]
        lines += ["", f"Press Ctrl-C to stop the {', '.join(stopped[:-1])} and {stopped[-1]}.", ""]
        self.stdout.write("\n".join(lines))

    def first_demo_lines(self, demo, site):
        body = json.dumps(DEMO_CALL)
        lines = [
            "",
            f"Try it: a demo MCP server runs at {demo['url']} with lookup_order (read-only) and",
            f'refund_order (destructive). Ask for a refund as the agent "{DEMO_AGENT}":',
            "",
            f"  curl -s -X POST {site}/api/v1/tool-calls \\",
            f'    -H "Authorization: Bearer {demo["token"]}" \\',
            '    -H "Content-Type: application/json" \\',
            f"    -d {shlex.quote(body)}",
            "",
            f'It answers "pending_approval": approve or deny it at {site}/approvals/',
            "(the agent's token is shown only this once; rotate it in the admin under Agents).",
        ]
        if demo["problem"]:
            lines += [
                "",
                f"Note: {demo['problem']}. Retry with:",
                f"  .venv/bin/python manage.py mcp_server sync {DEMO_SERVER}",
            ]
        return lines

    # Processes -------------------------------------------------------------------------------

    def supervise(self, processes):
        watched = dict(processes)
        while True:
            for name, process in list(watched.items()):
                if process.poll() is None:
                    continue
                if name in OPTIONAL:
                    self.stderr.write(
                        f"The demo MCP server exited ({process.returncode}); Toolgate keeps "
                        "running without it (TOOLGATE_DEMO=false leaves it out)."
                    )
                    del watched[name]
                    continue
                self.stderr.write(f"The {name} process exited ({process.returncode}); stopping.")
                return
            time.sleep(0.5)

    def stop(self, processes):
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # a second Ctrl-C must not cut this short
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in processes.values():
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()


def stop_on_signals():
    """Ctrl-C, and also SIGTERM (`kill`, `timeout`, a service manager) and SIGHUP (the
    terminal closed), stop every child instead of leaving them running without their parent.
    SIGINT is set too: started in the background by a shell, this process inherits it
    ignored."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)


def port_is_free(port):
    """Whether 127.0.0.1:`port` can be listened on (as uvicorn does, with SO_REUSEADDR)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_for_port(port, process, timeout=20):
    """True once something listens on 127.0.0.1:`port`; False if `process` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(0.1)
    return False
