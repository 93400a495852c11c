"""The Celery app: `celery -A config worker` runs tool calls and syncs, `celery -A config beat`
runs the periodic sync, expiry and sweeper."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("toolgate")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
