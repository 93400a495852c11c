"""The Celery app: `celery -A config worker` runs tool calls, syncs and notification deliveries
(every queue in CELERY_TASK_QUEUES unless told `-Q`), `celery -A config beat` runs the periodic
sync, expiry, sweeper and reminders."""

import os

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("toolgate")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@signals.worker_init.connect
def _no_database_pool_in_workers(**kwargs):
    """A worker process connects without the PostgreSQL pool (settings.DATABASE_POOL).

    Celery's Django fix-up closes every connection before and after each task, and with a
    pool in a prefork worker it closes the pool too (so no pool crosses the fork into the
    children): a pool would only add threads and a spare connection to every task. Here, in
    the worker's main process before any child is forked, the pool is closed and switched
    off, so the children connect as without it and nothing pooled is ever inherited."""
    from django.db import connections

    for alias in connections:
        options = connections[alias].settings_dict.get("OPTIONS", {})
        if options.get("pool"):
            if hasattr(connections[alias], "close_pool"):
                connections[alias].close()
                connections[alias].close_pool()
            del options["pool"]
