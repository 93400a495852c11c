"""The demo MCP server (tests/mcp_servers.py) on 127.0.0.1, in a process of its own.

``python -m bench.mcp_server`` prints the server's URL on one line, then serves until it gets
SIGTERM or SIGINT or its stdin closes (so it never outlives the benchmark that started it).

A process of its own, not a thread of the benchmark: the direct SDK calls the benchmarks time
would otherwise share one interpreter lock with the server they call.

By default the listening socket is made with ``proto=IPPROTO_TCP``. `tests.mcp_servers.start`
binds ``socket.socket(AF_INET, SOCK_STREAM)``, whose ``proto`` is 0, and asyncio only sets
TCP_NODELAY on accepted sockets whose ``proto`` is IPPROTO_TCP; so that server keeps Nagle's
algorithm on, and every response whose headers and body uvicorn writes separately waits
~40 ms for the client's delayed ACK. ``--tests-helper`` serves through `start` unchanged, to
see that effect; the default measures Toolgate rather than the test helper.
"""

import argparse
import signal
import socket
import sys
import threading
import time

import uvicorn

from tests.mcp_servers import demo_server, start

HOST = "127.0.0.1"


class _Running:
    def __init__(self, server, thread, url):
        self._server, self._thread, self.url = server, thread, url

    def stop(self):
        self._server.should_exit = True
        self._thread.join(timeout=10)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout=5)


def _start_with_nodelay():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind((HOST, 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        demo_server().streamable_http_app(),
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise SystemExit("the demo MCP server did not start")
        time.sleep(0.01)
    return _Running(server, thread, f"http://{HOST}:{port}/mcp")


def main(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.mcp_server")
    parser.add_argument("--tests-helper", action="store_true", help="serve via tests' start()")
    args = parser.parse_args(argv)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def watch_stdin():
        sys.stdin.read()  # returns at EOF: the parent closed the pipe or died
        stop.set()

    server = start(demo_server(), "streamable_http") if args.tests_helper else _start_with_nodelay()
    try:
        print(server.url, flush=True)
        threading.Thread(target=watch_stdin, daemon=True).start()
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
