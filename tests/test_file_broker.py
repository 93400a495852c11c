"""The embedded file broker (integrations/filebroker.py): a message is never read before it is
written whole; a sent message rings the workers' doorbells, so an idle worker takes it at once
rather than at its next look at the folder; and several workers still take each message
exactly once."""

import contextlib
import sys
import threading
from queue import Empty

import pytest
from django.conf import settings
from kombu import Connection, Consumer, Queue

from config.celery import app as celery_app
from tests.conftest import _file_broker_options

TRANSPORT = "integrations.filebroker:Transport"


def connect(folder, **options):
    base, _ = _file_broker_options(folder)
    return Connection("filesystem://", transport=TRANSPORT, transport_options={**base, **options})


class Worker(threading.Thread):
    """Drains `queue` like a Celery worker's consumer, until `stop` is set."""

    def __init__(self, folder, queue, received, stop, drain_timeout=1, **options):
        super().__init__(daemon=True)
        self.connection = connect(folder, **options)
        self.queue, self.received, self.stop = queue, received, stop
        self.drain_timeout = drain_timeout
        self.ready, self.took = threading.Event(), threading.Event()

    def run(self):
        with self.connection as conn, conn.channel() as channel:
            consumer = Consumer(channel, [Queue(self.queue)], callbacks=[self.take])
            consumer.consume()
            while not self.stop.is_set():
                self.ready.set()
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=self.drain_timeout)

    def take(self, body, message):
        self.received.append(body)
        message.ack()
        self.took.set()


def send(folder, queue, bodies):
    with connect(folder) as conn, conn.channel() as channel:
        producer = conn.Producer(channel)
        for body in bodies:
            producer.publish(body, routing_key=queue, declare=[Queue(queue)])


def test_a_sent_message_wakes_an_idle_worker_before_its_next_look(tmp_path):
    received, stop = [], threading.Event()
    # On its own the worker looks at the folder every minute (and its wait lasts 30 s).
    worker = Worker(tmp_path, "calls", received, stop, drain_timeout=30, polling_interval=60)
    worker.start()
    try:
        assert worker.ready.wait(10)
        # Its first wait has begun once drain_events found the folder empty.
        threading.Event().wait(0.5)
        send(tmp_path, "calls", [{"call": 1}])
        assert worker.took.wait(20), "the worker did not take the message before its next look"
        assert received == [{"call": 1}]
    finally:
        stop.set()
        send(tmp_path, "calls", [{"call": "bye"}])  # wakes it to see `stop`
        worker.join(10)


@pytest.mark.integration
def test_several_workers_take_each_message_once(tmp_path):
    received, stop = [], threading.Event()
    workers = [Worker(tmp_path, "calls", received, stop, polling_interval=0.05) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        for worker in workers:
            assert worker.ready.wait(10)
        send(tmp_path, "calls", [{"n": n} for n in range(60)])
        deadline = threading.Event()
        for _ in range(200):
            if len(received) >= 60:
                break
            deadline.wait(0.1)
    finally:
        stop.set()
        for worker in workers:
            worker.join(10)
    assert sorted(body["n"] for body in received) == list(range(60))


only_the_file_broker = pytest.mark.skipif(
    not settings.CELERY_BROKER_URL.startswith("filesystem://"), reason="the file broker only"
)


@only_the_file_broker
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
