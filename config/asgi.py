"""ASGI entry point. Toolgate is served by uvicorn so that agents waiting on a tool call
(`?wait=`) hold a coroutine, not a thread or a process each."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
application = get_asgi_application()
