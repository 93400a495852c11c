"""Doorbells: waking a process on the same machine at once, without a server.

A listener binds a unix datagram socket in a shared folder; a ringer sends a short datagram
to every socket there, without blocking. A socket whose listener died refuses the datagram and
is removed by the ringer. Used by the embedded defaults (SQLite and the file broker) to wake
waiting agents (approvals/wakeup.py) and idle workers (integrations/filebroker.py); what a
doorbell misses, the listener's slow poll finds.
"""

import contextlib
import errno
import itertools
import logging
import os
import select
import socket
from pathlib import Path

logger = logging.getLogger(__name__)

_names = itertools.count()


def ring(folder, payload=b"!"):
    """Send `payload` to every doorbell in `folder` (nothing happens when there is none)."""
    try:
        paths = list(Path(folder).iterdir())
    except FileNotFoundError:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        for path in paths:
            try:
                sock.sendto(payload, str(path))
            except ConnectionRefusedError:  # its listener is gone
                with contextlib.suppress(OSError):
                    path.unlink()
            except OSError as exc:  # a full buffer, a socket just removed: the poll catches up
                if exc.errno not in (errno.EAGAIN, errno.ENOENT):
                    raise


class Doorbell:
    """This process's doorbell in `folder`: `fileno()` is readable once it rang, `drain()`
    returns the payloads received since. Bind it before looking for work, so a ring between
    the look and the wait is not lost."""

    def __init__(self, folder):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{os.getpid()}-{next(_names)}.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.setblocking(False)
            self.sock.bind(str(self.path))  # OSError for a path over 107 bytes
        except OSError:
            self.sock.close()
            raise

    def fileno(self):
        return self.sock.fileno()

    def wait(self, seconds):
        """Wait until it rings or `seconds` pass; return the payloads received."""
        select.select([self.sock], [], [], seconds)
        return self.drain()

    def drain(self):
        payloads = []
        with contextlib.suppress(BlockingIOError):
            while True:
                payloads.append(self.sock.recv(64))
        return payloads

    def close(self):
        self.sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()
