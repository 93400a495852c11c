"""MCP clients and servers this project didn't write, installed from pinned lists on first use.

- Python: a throw-away venv per pinned list (`tests/mcp_py1/requirements.txt`: the official
  SDK 1.x, which can't live beside the 2.x Toolgate runs on), cached under
  `var/thirdparty/<list's hash>/` so later runs reuse it, built again when the list changes.
- npm: `npm ci` in a folder under tests/ holding a committed package.json + package-lock.json.

Each script the tests run prints one JSON line per event (see `events_of`).
"""

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, track

CACHE = ROOT / "var" / "thirdparty"


@contextlib.contextmanager
def _locked(name):
    """One installer at a time per cache entry (two test runs in one checkout)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def python_venv(requirements):
    """The interpreter of a venv holding exactly `requirements` (pinned); skips the test, saying
    why, when the packages can't be installed here."""
    digest = hashlib.sha256(Path(requirements).read_bytes()).hexdigest()[:16]
    home = CACHE / f"py-{Path(requirements).parent.name}-{digest}"
    python = home / "bin" / "python"
    with _locked(home.name):
        if (home / ".installed").exists():
            return str(python)
        shutil.rmtree(home, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(home)], check=True, timeout=120)
        install = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "--no-deps", "-r", str(requirements)],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if install.returncode != 0:
            shutil.rmtree(home, ignore_errors=True)
            _unavailable(f"Could not install {requirements}: {install.stderr.strip()[-500:]}")
        (home / ".installed").touch()
    return str(python)


def npm_folder(folder, marker):
    """`npm ci` in `folder` (committed package.json and lockfile) unless `marker` is installed;
    returns the folder. Skips (fails in CI), saying why, when npm can't install it."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        _unavailable("Node.js and npm are not installed.")
    folder = Path(folder)
    with _locked(f"npm-{folder.name}"):
        if not (folder / "node_modules" / marker).exists():
            install = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund"], cwd=folder, capture_output=True,
                text=True, timeout=600,
            )  # fmt: skip
            if install.returncode != 0:
                _unavailable(f"npm ci in {folder} failed: {install.stderr.strip()[-500:]}")
    return folder


def _unavailable(reason):
    """A third-party client that can't be installed: skipped on a developer's machine (say, no
    registry), but a failure in CI, where the registries are reachable, so a broken pin can't
    pass unnoticed as a skip."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def start(command, **options):
    """A tracked process (stopped at the end of the run whatever happens) with piped output."""
    return track(
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options
        )
    )


def events_of(process, timeout=120):
    """The JSON lines a script printed, once it exits."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"{process.args[:3]} hung; it printed:\n{out}\n{err[-3000:]}")
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert events, err[-3000:]
    return events
