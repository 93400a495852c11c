"""The embedded broker: kombu's filesystem transport, plus a doorbell so that an idle worker
takes a new message at once instead of at its next look at the folder.

kombu's transport stays as it is (a message is a file, claimed by exactly one consumer;
exchange tables are written under a file lock) but for two races in sending and taking a
message (see `Channel`). Publishing rings every worker's doorbell (integrations/doorbell.py) in
`<broker dir>/doorbells/` after writing the file, and a worker with nothing to do waits on its
doorbell, for at most `polling_interval`, where kombu would sleep for it. A message published
by a plain `filesystem://` connection (no doorbell) is found by that slower look.
Selected by CELERY_BROKER_TRANSPORT in config/settings.py when the broker URL is filesystem://.
"""

import logging
import os
import uuid
from pathlib import Path
from queue import Empty
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads

from integrations import doorbell

logger = logging.getLogger(__name__)


def _doorbells(channel):
    return Path(channel.data_folder_in).parent / "doorbells"


class Channel(filesystem.Channel):
    """Two races of kombu's channel are closed here, as several workers meet them: a message
    file is written under a temporary name and renamed into place (a consumer listing the
    folder mid-write read it empty and lost the message), and a consumer claims a file by
    renaming it into the processed folder beside the queue (kombu moves it to the system's
    temporary folder, a copy and a delete when that is another file system, which two
    consumers can both do)."""

    def _put(self, queue, payload, **kwargs):
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = Path(self.data_folder_out) / name
        partial = final.with_name(f".{name}.partial")  # never matches a queue's files
        try:
            partial.write_bytes(str_to_bytes(dumps(payload)))
            os.rename(partial, final)
        except OSError as exc:
            raise ChannelError(f"Cannot add a message to {self.data_folder_out!r}") from exc
        doorbell.ring(_doorbells(self))

    def _get(self, queue):
        wanted = f"{queue}.msg"
        for name in sorted(os.listdir(self.data_folder_in)):
            if name.partition(".")[2] != wanted:
                continue
            claimed = Path(self.processed_folder) / name
            try:
                os.rename(Path(self.data_folder_in) / name, claimed)
            except OSError:  # another consumer took it
                continue
            try:
                payload = claimed.read_bytes()
                if not self.store_processed:
                    claimed.unlink()
            except OSError as exc:
                raise ChannelError(f"Cannot read the message {name!r}") from exc
            return loads(bytes_to_str(payload))
        raise Empty()


class Transport(filesystem.Transport):
    Channel = Channel
    bell = None

    def drain_events(self, connection, timeout=None):
        """kombu's loop (try every queue, wait, again), waiting on the doorbell."""
        bell = self._doorbell(connection)
        if bell is None:
            return super().drain_events(connection, timeout)
        started = monotonic()
        while True:
            try:
                return self.cycle.get(self._deliver, timeout=timeout)
            except Empty:
                wait = self.polling_interval
                if timeout is not None:
                    left = timeout - (monotonic() - started)
                    if left <= 0:
                        raise TimeoutError() from None
                    wait = min(wait, left)
                bell.wait(wait)

    def _doorbell(self, connection):
        if self.bell is None and connection.channels:
            try:
                self.bell = doorbell.Doorbell(_doorbells(connection.channels[0]))
            except OSError:  # e.g. too long a path for a socket: kombu's polling only
                logger.warning("No doorbell for the file broker", exc_info=True)
                self.bell = False
        return self.bell or None

    def close_connection(self, connection):
        if self.bell:
            self.bell.close()
            self.bell = None
        super().close_connection(connection)
