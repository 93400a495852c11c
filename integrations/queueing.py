"""Enqueueing Celery tasks once the current transaction commits, without letting a broker
outage turn a committed change into an error page."""

import logging

from django.db import transaction
from kombu.exceptions import OperationalError

logger = logging.getLogger(__name__)


def enqueue_on_commit(task, pk, on_failure=None):
    """Send `task(pk)` after commit. If the broker can't be reached, log it and call
    `on_failure()`: the row is already saved, and the periodic jobs pick the work up again."""

    def send():
        try:
            task.delay(pk)
        except OperationalError:
            logger.warning("Could not queue %s(%s): the broker is unreachable", task.name, pk)
            if on_failure:
                on_failure()

    transaction.on_commit(send)
