"""The Celery app: `celery -A config worker` runs tool calls, syncs and notification deliveries
(every queue in CELERY_TASK_QUEUES unless told `-Q`), `celery -A config beat` runs the periodic
sync, expiry, sweeper and reminders."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("toolgate")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
