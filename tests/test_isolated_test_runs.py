"""Every test run keeps to itself: its own broker (a folder, or a Redis key prefix), its own
test database, and every process a test starts is stopped when the run ends, whether the test
passed, failed or the run was interrupted (tests/conftest.py)."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from django.conf import settings
from django.db import connection
from kombu import Connection

from config.celery import app as celery_app
from tests import conftest
from tests.conftest import RUN_ID, track, wait_until

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.integration
def test_this_run_has_a_broker_of_its_own(celery_broker):
    options = celery_app.conf.broker_transport_options
    if settings.CELERY_BROKER_URL.startswith("redis"):
        prefix = options["global_keyprefix"]
        assert RUN_ID in prefix and celery_broker["CELERY_BROKER_KEY_PREFIX"] == prefix
        with Connection(settings.CELERY_BROKER_URL, transport_options=options) as conn:
            queue = conn.SimpleQueue(f"isolation-{RUN_ID}")
            queue.put({"hello": "run"})
            keys = [key.decode() for key in conn.default_channel.client.scan_iter(match="*")]
            queue.clear()
            queue.close()
        assert all(key.startswith(prefix) for key in keys if f"isolation-{RUN_ID}" in key)
        assert any(f"isolation-{RUN_ID}" in key for key in keys)
    else:
        folder = Path(options["data_folder_in"])
        assert folder.is_relative_to(conftest.RUN_DIR) and RUN_ID in str(folder)
        assert not folder.is_relative_to(Path(settings.VAR_DIR))  # not `make run`'s broker
        assert Path(celery_broker["CELERY_BROKER_DIR"]) == folder.parent


@pytest.mark.integration
@pytest.mark.django_db
def test_this_run_has_a_database_of_its_own():
    name = str(connection.settings_dict["NAME"])
    assert RUN_ID in name
    if connection.vendor == "sqlite":
        assert not Path(name).is_relative_to(Path(settings.VAR_DIR))


# A process tree as a test might leave it: a parent in its own process group, a child, and a
# grandchild whose parent has exited (outside the parent's tree, still in its group). With
# "and-exit" the parent exits too once it has written the pids, orphaning both.
TREE = """
import json, os, subprocess, sys, time
sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
child = subprocess.Popen(sleep)
middle = subprocess.Popen(
    [sys.executable, "-c", "import subprocess, sys; print(subprocess.Popen(%r).pid)" % (sleep,)],
    stdout=subprocess.PIPE, text=True,
)
orphan = int(middle.stdout.readline())  # not read(): the orphan holds the pipe open
middle.wait()
with open(sys.argv[1] + ".tmp", "w") as out:
    json.dump([os.getpid(), child.pid, orphan], out)
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
if sys.argv[2:] != ["and-exit"]:
    time.sleep(600)
"""

INNER = """
import json, os, subprocess, sys, time
from pathlib import Path
import psutil
from tests.conftest import track

PIDS = Path(os.environ["INNER_PIDS"])
TREE = {tree!r}


def start_tree():
    track(subprocess.Popen([sys.executable, "-c", TREE, str(PIDS)], start_new_session=True))
    while not PIDS.exists():
        time.sleep(0.05)


def test_fails_with_a_process_tree_running():
    start_tree()
    raise AssertionError("failing on purpose")


def test_hangs_with_a_process_tree_running():
    start_tree()
    Path(str(PIDS) + ".ready").touch()
    time.sleep(600)


def test_leaves_an_untracked_orphan_behind():
    # Not tracked, in a session of its own, and its parent gone: only the run's mark finds it.
    command = [sys.executable, "-c", TREE, str(PIDS), "and-exit"]
    subprocess.run(command, start_new_session=True, timeout=60, check=True)


def test_fails_with_a_celery_worker_running(celery_worker):
    tree = psutil.Process(celery_worker.pid)
    PIDS.write_text(json.dumps([tree.pid, *(c.pid for c in tree.children(recursive=True))]))
    raise AssertionError("failing on purpose")
"""


def inner_run(tmp_path, test_name):
    """Another pytest run of this suite's conftest (as the root conftest of `tmp_path`, so it
    loads after Django is set up, as tests/conftest.py does), running one test of INNER."""
    (tmp_path / "conftest.py").write_text(
        "from tests.conftest import *  # noqa: F403 - the suite's fixtures, hooks and plugins\n"
    )
    (tmp_path / "test_inner.py").write_text(INNER.format(tree=TREE))
    run_id = f"inner{os.getpid()}{test_name[-6:]}"
    env = {**os.environ, "INNER_PIDS": str(tmp_path / "pids.json"), "TOOLGATE_TEST_RUN_ID": run_id}
    command = [
        sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"),
        "--rootdir", str(tmp_path), "-p", "no:cacheprovider", "-q",
        f"{tmp_path / 'test_inner.py'}::{test_name}",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    return track(process), run_id


def gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def assert_cleaned_up(tmp_path, run_id, output):
    pids = json.loads((tmp_path / "pids.json").read_text())
    assert len(pids) >= 3, output
    wait_until(lambda: all(gone(pid) for pid in pids), timeout=30)
    leftovers = list(Path(tempfile.gettempdir()).glob(f"toolgate-test-{run_id}-*"))
    assert leftovers == [], leftovers  # its broker folder and SQLite database went too


def test_a_failing_test_leaves_no_process_behind(tmp_path):
    process, run_id = inner_run(tmp_path, "test_fails_with_a_process_tree_running")
    output, _ = process.communicate(timeout=180)
    assert process.returncode == 1 and "failing on purpose" in output, output
    assert_cleaned_up(tmp_path, run_id, output)


def test_a_run_stopped_with_sigterm_leaves_no_process_behind(tmp_path):
    process, run_id = inner_run(tmp_path, "test_hangs_with_a_process_tree_running")
    wait_until(lambda: (tmp_path / "pids.json.ready").exists() or process.poll() is not None, 120)
    assert process.poll() is None, process.stdout.read()
    time.sleep(0.2)  # let the inner test reach its sleep
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0 and "stopped by signal" in output, output
    assert_cleaned_up(tmp_path, run_id, output)


def test_a_process_a_test_did_not_track_is_stopped_too(tmp_path):
    process, run_id = inner_run(tmp_path, "test_leaves_an_untracked_orphan_behind")
    output, _ = process.communicate(timeout=180)
    assert process.returncode == 0, output
    assert_cleaned_up(tmp_path, run_id, output)


@pytest.mark.integration
def test_a_failing_test_leaves_no_celery_worker_behind(tmp_path):
    process, run_id = inner_run(tmp_path, "test_fails_with_a_celery_worker_running")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 1 and "failing on purpose" in output, output
    assert_cleaned_up(tmp_path, run_id, output)
