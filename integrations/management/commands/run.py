"""`manage.py run`: the whole app on one machine (what `make run` starts).

Starts the web server (uvicorn, ASGI), a Celery worker and Celery beat as child processes,
stops all of them on Ctrl-C, and stops the rest if one of them dies. On first run with an empty
database it creates the superuser `admin` and prints its password once.
"""

import os
import secrets
import signal
import subprocess
import sys
import time

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Run the web server, a Celery worker and Celery beat together (Ctrl-C stops all)."

    def handle(self, *args, **options):
        password = self.create_first_superuser()
        processes = self.start_processes()
        self.announce(password)
        try:
            self.supervise(processes)
        except KeyboardInterrupt:
            self.stdout.write("\nStopping…")
        finally:
            self.stop(processes)

    def create_first_superuser(self):
        User = get_user_model()
        if User.objects.exists():
            return None
        password = os.environ.get("DJANGO_SUPERUSER_PASSWORD") or secrets.token_urlsafe(12)
        User.objects.create_superuser("admin", email="", password=password)
        return password

    def start_processes(self):
        python = sys.executable
        celery = [python, "-m", "celery", "-A", "config"]
        commands = {
            "web": [
                python, "-m", "uvicorn", "config.asgi:application",
                "--host", "127.0.0.1", "--port", str(settings.PORT), "--log-level", "warning",
            ],
            "worker": [*celery, "worker", "--loglevel", "INFO", "--concurrency", "2"],
            "beat": [
                *celery, "beat", "--loglevel", "INFO",
                "--schedule", settings.CELERY_BEAT_SCHEDULE_FILENAME,
            ],
        }  # fmt: skip
        return {name: subprocess.Popen(command) for name, command in commands.items()}

    def announce(self, password):
        url = f"{settings.SITE_URL}/admin/"
        lines = ["", f"Toolgate is running: log in at {url}"]
        if password and not os.environ.get("DJANGO_SUPERUSER_PASSWORD"):
            lines.append(f"  user: admin   password: {password}   (shown once; change it)")
        elif password:
            lines.append("  user: admin   password: $DJANGO_SUPERUSER_PASSWORD")
        lines += ["Press Ctrl-C to stop the web server, worker and scheduler.", ""]
        self.stdout.write("\n".join(lines))

    def supervise(self, processes):
        while True:
            for name, process in processes.items():
                if process.poll() is not None:
                    self.stderr.write(
                        f"The {name} process exited ({process.returncode}); stopping."
                    )
                    return
            time.sleep(0.5)

    def stop(self, processes):
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in processes.values():
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()
