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
    off, so the children connect as without it and nothing pooled is ever inherited. Each
    child keeps its own connection from task to task instead (`_keep_connections`)."""
    from django.db import connections

    for alias in connections:
        db = connections[alias].settings_dict
        if db.get("OPTIONS", {}).get("pool"):
            if hasattr(connections[alias], "close_pool"):
                connections[alias].close()
                connections[alias].close_pool()
            del db["OPTIONS"]["pool"]
            db["CONN_MAX_AGE"] = 60  # as without the pool: kept by the child (see below)
    connections.close_all()  # nothing open in the main process for a child to inherit


@signals.task_prerun.connect
@signals.task_postrun.connect
def _keep_connections(**kwargs):
    """Between tasks, treat each connection as Django treats one between requests: keep it
    for CONN_MAX_AGE, checked before its next use (CONN_HEALTH_CHECKS), closed when it broke.

    On PostgreSQL, Celery's fix-up is told to close only every CELERY_DB_REUSE_MAX tasks
    (settings.py): opening a connection per task took ~10 ms of every approved call. Forks stay
    safe as Celery made them: the main process closes its connections before forking, and a
    child closes the descriptors of whatever it inherited without touching the socket."""
    from django.db import close_old_connections

    task = kwargs.get("task")
    if task is None or getattr(task.request, "is_eager", False):
        return  # run in the caller's process (and maybe its transaction): not ours to close
    close_old_connections()
