"""The embedded broker (kombu's filesystem transport, as config/file_broker.py configures it)."""

import sys
from queue import Empty

import pytest
from django.conf import settings

from config.celery import app as celery_app

pytestmark = pytest.mark.skipif(
    not settings.CELERY_BROKER_URL.startswith("filesystem://"), reason="the file broker only"
)


def test_a_message_is_never_read_before_it_is_written(tmp_path, monkeypatch):
    """A worker reading a message its sender had opened but not yet written got an empty file:
    a JSON error that stops the worker's consumer for good (it took the session's worker down
    in a flaky notification test). Here the reader looks in the middle of the write."""
    folders = {name: tmp_path / name for name in ("queue", "processed", "control")}
    for folder in folders.values():
        folder.mkdir()
    options = {
        "data_folder_in": str(folders["queue"]),
        "data_folder_out": str(folders["queue"]),
        "processed_folder": str(folders["processed"]),
        "control_folder": str(folders["control"]),
        "store_processed": False,
    }
    with (
        celery_app.connection_for_write(transport_options=options) as sender,
        celery_app.connection_for_read(transport_options=options) as worker,
    ):
        outbox, inbox = sender.SimpleQueue("tasks"), worker.SimpleQueue("tasks")
        seen_mid_write = []

        # The transport's writer turns the JSON into bytes between creating its file and
        # writing it: look into the queue at exactly that moment.
        writer = sys.modules[type(sender.default_channel)._put.__module__]
        encode = writer.str_to_bytes

        def read_meanwhile(text):
            try:
                seen_mid_write.append(inbox.get(block=False).payload)
            except Empty:
                seen_mid_write.append(None)
            return encode(text)

        monkeypatch.setattr(writer, "str_to_bytes", read_meanwhile)
        outbox.put({"task": "first"})
        monkeypatch.undo()

        assert seen_mid_write == [None]  # not there yet, rather than there but empty
        message = inbox.get(block=False)
        assert message.payload == {"task": "first"}
        message.ack()
