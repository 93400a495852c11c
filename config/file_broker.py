"""The embedded broker: kombu's filesystem transport, with each message written atomically.

kombu (5.7; celery/kombu#1551, open) opens a message file under its final name, then writes it,
and the consumer neither locks nor waits: it can take a file still empty. The JSON error that
follows is "unrecoverable" to Celery, and the worker stops taking tasks until it is restarted
(a flaky notification test found it; a stress test with four senders and a busy reader lost
3 to 56 messages in 8,000 on a loaded machine). Here a message is written under a name the
consumer ignores, then renamed into place, which is atomic within one folder.
"""

import os
import uuid
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        # kombu's own name (time first: the consumer takes messages in name order).
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        path = os.path.join(self.data_folder_out, name)
        partial = path + ".part"  # not "<queue>.msg" after the first dot: never read
        try:
            with open(partial, "wb") as out:
                out.write(str_to_bytes(dumps(payload)))
            os.replace(partial, path)
        except OSError as exc:
            raise ChannelError(f"Cannot add a message to {self.data_folder_out!r}") from exc


class Transport(filesystem.Transport):
    Channel = Channel
