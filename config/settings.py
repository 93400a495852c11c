"""Toolgate settings.

Every value that comes from the environment is read here and nowhere else. The defaults need
nothing: SQLite and a file-based Celery broker under ``var/``, so ``make run`` and ``make test``
work on a fresh machine. Production sets ``DEBUG=false`` and real secrets; see README.md.

A malformed value stops start-up with a message naming the variable, rather than surfacing
later as a confusing error deep inside Django or Celery.
"""

import json
import os
import re
import secrets
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import environ
from cryptography.fernet import Fernet
from django.core.exceptions import ImproperlyConfigured
from kombu import Queue

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env")  # optional; real environment variables win


class _Invalid(ValueError):
    """A malformed value, in words that quote none of it (safe for a value with a password)."""


def _read(name, cast, default, secret=False):
    """Read one variable, turning a malformed value into a start-up error that names it. A
    value that may hold a password (`secret`) is never quoted, and neither is the parser's own
    message: "Port could not be cast to integer value as 'pa'" is what a password with an
    unencoded "/" gives, and quotes the start of the password."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = cast(raw)
    except (ValueError, TypeError, environ.ImproperlyConfigured) as exc:
        if not secret:
            raise ImproperlyConfigured(f"{name}={raw!r} is not valid: {exc}") from None
        problem = exc if isinstance(exc, _Invalid) else _url_problem(raw, exc)
        raise ImproperlyConfigured(
            f"{name} is not valid: {problem}. (The value is not shown: it may hold a password.)"
        ) from None
    return value


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]{0,30})://")
_ENCODE_HINT = (
    "a password or user name must have its special characters percent-encoded "
    "(/ : @ # ? % as %2F %3A %40 %23 %3F %25)"
)


def _url_problem(raw, exc):
    """What is wrong with the URL `raw`, from the parser's exception, quoting none of `raw`."""
    text = str(exc).lower()
    if "port" in text:
        return f"its port is not a number; {_ENCODE_HINT}"
    if "ipv6" in text:
        return f"its host is malformed; {_ENCODE_HINT}"
    if "schem" in text:
        return _scheme_problem(raw, "a supported scheme")
    return f"it can't be read as a URL; {_ENCODE_HINT}"


def _scheme_problem(raw, expected):
    match = _SCHEME.match(raw)
    if not match:
        return f"it does not start with scheme:// ({expected})"
    return f"the scheme {match[1]!r} is not {expected}"


def _checked_url(raw, schemes):
    """`raw` if it is a URL with one of `schemes` whose host and port parse; else `_Invalid`."""
    match = _SCHEME.match(raw)
    if not match or match[1].lower() not in schemes:
        expected = " or ".join(f"{scheme}://" for scheme in sorted(schemes))
        raise _Invalid(_scheme_problem(raw, expected))
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - parses the port, raising ValueError when it isn't one
    except ValueError as exc:
        raise _Invalid(_url_problem(raw, exc)) from None
    return raw


def _bool(raw):
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("expected true or false")


def _positive(kind):
    def cast(raw):
        value = kind(raw)
        if value <= 0:
            raise ValueError("expected a positive number")
        return value

    return cast


def _count(raw):
    value = int(raw)
    if value < 0:
        raise ValueError("expected 0 or more")
    return value


def _choice(*choices):
    def cast(raw):
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return cast


def _list(raw):
    return [item.strip() for item in raw.split(",") if item.strip()]


DEBUG = _read("DEBUG", _bool, True)
VAR_DIR = Path(_read("TOOLGATE_VAR_DIR", str, str(BASE_DIR / "var")))
VAR_DIR.mkdir(parents=True, exist_ok=True)


def _development_secrets():
    """Secrets for a development machine, made once and kept in var/ so restarts keep data.

    Only used with DEBUG on. Production must provide SECRET_KEY and FIELD_ENCRYPTION_KEYS.
    """
    path = VAR_DIR / "dev-secrets.json"
    if not path.exists():
        values = {
            "SECRET_KEY": secrets.token_urlsafe(50),
            "FIELD_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(values, f)
    return json.loads(path.read_text())


_dev = _development_secrets() if DEBUG else {}
SECRET_KEY = os.environ.get("SECRET_KEY") or _dev.get("SECRET_KEY")
FIELD_ENCRYPTION_KEYS = _list(
    os.environ.get("FIELD_ENCRYPTION_KEYS") or _dev.get("FIELD_ENCRYPTION_KEYS", "")
)
if not DEBUG:
    if not SECRET_KEY or len(SECRET_KEY) < 50 or len(set(SECRET_KEY)) < 5:
        raise ImproperlyConfigured(
            "SECRET_KEY must be set to a random value of at least 50 characters when DEBUG is off."
        )
    if not FIELD_ENCRYPTION_KEYS:
        raise ImproperlyConfigured(
            "FIELD_ENCRYPTION_KEYS must be set when DEBUG is off: one or more Fernet keys, "
            "comma-separated, newest first. Make one with: python -c "
            '"from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"'
        )
for _key in FIELD_ENCRYPTION_KEYS:
    try:
        Fernet(_key)
    except ValueError:
        raise ImproperlyConfigured(
            "FIELD_ENCRYPTION_KEYS holds a value that is not a Fernet key "
            "(32 url-safe base64-encoded bytes)."
        ) from None

ALLOWED_HOSTS = _read("ALLOWED_HOSTS", _list, ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = _read("CSRF_TRUSTED_ORIGINS", _list, [])
PORT = _read("PORT", _positive(int), 8000)
DEMO_MCP_PORT = _read("DEMO_MCP_PORT", _positive(int), PORT + 1)  # `make run`'s demo MCP server
TOOLGATE_DEMO = _read("TOOLGATE_DEMO", _bool, DEBUG)  # start and register that demo server
SITE_URL = _read("SITE_URL", str, f"http://127.0.0.1:{PORT}")

INSTALLED_APPS = [
    "config.apps.ToolgateAdminConfig",  # django.contrib.admin, secrets never rendered
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "integrations",
    "approvals",
    "axes",  # login throttling on both login pages
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "config.middleware.SecurityHeadersMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "axes.middleware.AxesMiddleware",  # last, as django-axes asks; async-capable
]
# DEBUG (`make run`) would show Django's technical 404 and 500 pages (URL patterns, traceback,
# settings); the site's own pages are kept unless TECHNICAL_ERROR_PAGES is set.
TECHNICAL_ERROR_PAGES = _read("TECHNICAL_ERROR_PAGES", _bool, False)
if DEBUG:
    MIDDLEWARE.insert(-1, "config.middleware.StyledErrorPagesMiddleware")

# The agent API (/api/, config/asgi.py): Bearer tokens, no sessions, users, messages or CSRF
# (its views are csrf_exempt), so only what sets headers, the same as for the pages but run
# inline; the pages' middleware would cost it a hop to the shared thread for each method.
API_MIDDLEWARE = [
    "config.middleware.InlineSecurityMiddleware",
    "config.middleware.SecurityHeadersMiddleware",
    "config.middleware.InlineCommonMiddleware",
    "config.middleware.InlineXFrameOptionsMiddleware",
]
if DEBUG:  # no technical 404/500 pages for agents either
    API_MIDDLEWARE.append("config.middleware.StyledErrorPagesMiddleware")

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "approvals.context_processors.approval_queue",
            ],
        },
    },
]
# Error pages in the site's layout (templates/403.html, 404.html, 500.html, 403_csrf.html).
CSRF_FAILURE_VIEW = "config.views.csrf_failure"


def _database(raw):
    _checked_url(raw, {"postgres", "postgresql", "pgsql", "sqlite"})
    config = env.db_url_config(raw)
    if config.get("ENGINE") not in {"django.db.backends.sqlite3", "django.db.backends.postgresql"}:
        raise _Invalid("use a postgres:// or sqlite:/// URL")
    return config


DATABASES = {
    "default": _read(
        "DATABASE_URL",
        _database,
        _database(f"sqlite:///{VAR_DIR / 'toolgate.sqlite3'}"),
        secret=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # A file, not :memory:, so the Celery worker the integration tests start can share it
    # (tests/conftest.py moves it into the test run's own folder).
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test.sqlite3")}
    # Wait for the writer lock instead of failing at once when web and worker write together.
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault("timeout", 20)
    DATABASES["default"]["OPTIONS"].setdefault("transaction_mode", "IMMEDIATE")
    # WAL: readers (waiting agents, the queue page) don't block the writers deciding calls.
    DATABASES["default"]["OPTIONS"].setdefault("init_command", "PRAGMA journal_mode=WAL;")
# PostgreSQL: a pool of connections per process (Django's, on psycopg-pool), because the web
# process runs each page request on a thread of its own and a connection is per thread: without
# the pool every page request would open a connection (~15 ms of an approval click, issue 11).
# A thread takes a connection at its first query and gives it back when its request ends (the
# agent API's shared thread too); the pool opens up to MAX_SIZE and a request waits up to
# TIMEOUT seconds for a free one. Celery workers run without it (config/celery.py), so no
# pooled connection crosses a fork into a prefork child. DATABASE_POOL=false is the old
# behaviour (a connection per thread, kept 60 s), e.g. behind PgBouncer in transaction mode.
DATABASE_POOL = _read("DATABASE_POOL", _bool, True)
DATABASE_POOL_MIN_SIZE = _read("DATABASE_POOL_MIN_SIZE", _count, 2)
DATABASE_POOL_MAX_SIZE = _read("DATABASE_POOL_MAX_SIZE", _positive(int), 20)
DATABASE_POOL_TIMEOUT = _read("DATABASE_POOL_TIMEOUT", _positive(float), 10.0)
if DATABASE_POOL_MIN_SIZE > DATABASE_POOL_MAX_SIZE:
    raise ImproperlyConfigured(
        f"DATABASE_POOL_MIN_SIZE ({DATABASE_POOL_MIN_SIZE}) is larger than "
        f"DATABASE_POOL_MAX_SIZE ({DATABASE_POOL_MAX_SIZE})."
    )
if DATABASE_POOL and DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": DATABASE_POOL_MIN_SIZE,
        "max_size": DATABASE_POOL_MAX_SIZE,
        "timeout": DATABASE_POOL_TIMEOUT,
    }
    DATABASES["default"]["CONN_MAX_AGE"] = 0  # as Django's pool requires: each request gives
    # its connection back to the pool when it ends
# PostgreSQL: the hot path's few statements (integrations/statements.py) are prepared on the
# server once per connection instead of planned at every run (~0.5 ms for the tool's lookup,
# issue 11). Turn off behind PgBouncer in transaction mode unless it is 1.21 or later with
# max_prepared_statements above 0 (it can't carry them otherwise); the rest of the ORM's SQL is
# never prepared (Django's default).
DATABASE_PREPARED_STATEMENTS = _read("DATABASE_PREPARED_STATEMENTS", _bool, True)
DATABASES["default"].setdefault("CONN_MAX_AGE", 60)
DATABASES["default"].setdefault("CONN_HEALTH_CHECKS", True)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Login throttling (django-axes) on /admin/login/ and /accounts/login/: after
# LOGIN_FAILURE_LIMIT wrong passwords, further tries are refused for LOGIN_LOCKOUT_MINUTES
# (429 and a page saying so), counted per username and client address by default. Behind a
# proxy, have uvicorn take the client address from it (--forwarded-allow-ips), or every
# client counts as the proxy.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
_LOCKOUT_BY = {
    "username_and_ip": [["username", "ip_address"]],
    "ip": ["ip_address"],
    "username": ["username"],
}


def _lockout_by(raw):
    if raw not in _LOCKOUT_BY:
        raise ValueError(f"expected one of {', '.join(_LOCKOUT_BY)}")
    return _LOCKOUT_BY[raw]


AXES_ENABLED = _read("LOGIN_THROTTLING", _bool, True)
AXES_FAILURE_LIMIT = _read("LOGIN_FAILURE_LIMIT", _positive(int), 5)
AXES_COOLOFF_TIME = timedelta(minutes=_read("LOGIN_LOCKOUT_MINUTES", _positive(int), 15))
AXES_LOCKOUT_PARAMETERS = _read("LOGIN_LOCKOUT_BY", _lockout_by, _LOCKOUT_BY["username_and_ip"])
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
AXES_HTTP_RESPONSE_CODE = 429
AXES_DISABLE_ACCESS_LOG = True  # keep the failed attempts only, not every successful login
AXES_VERBOSE = False

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = _read("TIME_ZONE", str, "UTC")
USE_I18N = True
USE_TZ = True
FORMAT_MODULE_PATH = ["config.formats"]  # times with seconds in the admin, like the history

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STATIC_ROOT.mkdir(exist_ok=True)  # collectstatic fills it; the static file servers need it
STATICFILES_DIRS = [BASE_DIR / "static"]

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "/approvals/"
LOGOUT_REDIRECT_URL = "login"

# Security headers. HTTPS-only cookies and HSTS are on whenever DEBUG is off.
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SECURE = not DEBUG
CSRF_COOKIE_SECURE = not DEBUG
SECURE_SSL_REDIRECT = _read("SECURE_SSL_REDIRECT", _bool, not DEBUG)
SECURE_HSTS_SECONDS = _read("SECURE_HSTS_SECONDS", int, 0 if DEBUG else 31536000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = not DEBUG
SECURE_HSTS_PRELOAD = not DEBUG
if _read("BEHIND_TLS_PROXY", _bool, False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# Celery. The embedded default is kombu's filesystem transport: a real broker that needs no
# server, good for one machine. Production points CELERY_BROKER_URL at Redis.
CELERY_BROKER_URL = _read(
    "CELERY_BROKER_URL",
    lambda raw: _checked_url(raw, {"filesystem", "redis", "rediss"}),
    "filesystem://",
    secret=True,
)
CELERY_BROKER_DIR = Path(_read("CELERY_BROKER_DIR", str, str(VAR_DIR / "broker")))
if CELERY_BROKER_URL.startswith("filesystem://"):
    (CELERY_BROKER_DIR / "queue").mkdir(parents=True, exist_ok=True)
    (CELERY_BROKER_DIR / "processed").mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(CELERY_BROKER_DIR / "queue"),
        "data_folder_out": str(CELERY_BROKER_DIR / "queue"),
        "processed_folder": str(CELERY_BROKER_DIR / "processed"),
        "control_folder": str(CELERY_BROKER_DIR / "control"),
        "store_processed": False,
        # A worker is woken by the doorbell of integrations/filebroker.py when a message is
        # sent; this is only how often an idle one looks anyway (for a missed ring).
        "polling_interval": 1.0,
    }
    CELERY_BROKER_TRANSPORT = "integrations.filebroker:Transport"
else:
    CELERY_BROKER_TRANSPORT_OPTIONS = {}
# A prefix for every key Toolgate puts in Redis, so that several deployments (or test runs) can
# share one Redis database without reading each other's tasks.
CELERY_BROKER_KEY_PREFIX = _read("CELERY_BROKER_KEY_PREFIX", str, "")
if CELERY_BROKER_KEY_PREFIX and CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
    CELERY_BROKER_TRANSPORT_OPTIONS["global_keyprefix"] = CELERY_BROKER_KEY_PREFIX
CELERY_TASK_IGNORE_RESULT = True  # outcomes live on our models, not in a result backend
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Celery's Django fix-up closes the connections before and after every task; on PostgreSQL,
# where opening one costs ~10 ms of each call, only every this many tasks, and between tasks
# config/celery.py keeps them as Django does between requests (CONN_MAX_AGE, health checks).
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    CELERY_DB_REUSE_MAX = 1000
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
# Queues: tool calls, syncs and notification deliveries each have their own, so a sync fan-out
# (up to MCP_SYNC_TIMEOUT per server) or a slow mail server never sits in front of a call a
# human approved; periodic maintenance stays on the default `celery` queue. A worker started
# without -Q consumes every queue listed here (`make run`'s does); `-Q calls` gives calls
# workers of their own (README.md, "Production").
CELERY_TASK_QUEUES = [Queue("celery"), Queue("calls"), Queue("syncs"), Queue("notifications")]
CELERY_TASK_ROUTES = {
    "approvals.tasks.run_tool_call": {"queue": "calls"},
    "integrations.tasks.sync_server": {"queue": "syncs"},
    "integrations.tasks.sync_all_servers": {"queue": "syncs"},
    "approvals.tasks.flush_notifications": {"queue": "notifications"},
    "approvals.tasks.send_notification": {"queue": "notifications"},
}
# MCP servers.
MCP_SYNC_INTERVAL = _read("MCP_SYNC_INTERVAL", _positive(int), 900)  # seconds between syncs
MCP_CONNECT_TIMEOUT = _read("MCP_CONNECT_TIMEOUT", _positive(float), 10.0)
MCP_READ_TIMEOUT = _read("MCP_READ_TIMEOUT", _positive(float), 30.0)
MCP_SYNC_TIMEOUT = _read("MCP_SYNC_TIMEOUT", _positive(float), 60.0)  # a whole sync, all pages
MCP_CALL_TIMEOUT = _read("MCP_CALL_TIMEOUT", _positive(float), 120.0)  # one tool call
MCP_MAX_RESPONSE_BYTES = _read("MCP_MAX_RESPONSE_BYTES", _positive(int), 10 * 1024 * 1024)
MCP_MAX_TOOLS = _read("MCP_MAX_TOOLS", _positive(int), 1000)
# One sync: all the bytes its responses may carry, and the pages of the tool list.
MCP_SYNC_MAX_BYTES = _read("MCP_SYNC_MAX_BYTES", _positive(int), 20 * 1024 * 1024)
MCP_SYNC_MAX_PAGES = _read("MCP_SYNC_MAX_PAGES", _positive(int), 100)
# One stored tool definition (larger ones are refused at sync) and one stored tool result
# (larger ones are stored cut, with a marker saying so).
MCP_MAX_TOOL_DEFINITION_BYTES = _read("MCP_MAX_TOOL_DEFINITION_BYTES", _positive(int), 64 * 1024)
MCP_MAX_RESULT_BYTES = _read("MCP_MAX_RESULT_BYTES", _positive(int), 1024 * 1024)
MCP_EXTRA_BLOCKED_NETWORKS = _read("MCP_EXTRA_BLOCKED_NETWORKS", _list, [])
MCP_EXTRA_ALLOWED_NETWORKS = _read("MCP_EXTRA_ALLOWED_NETWORKS", _list, [])
# Open upstream sessions the web process keeps for its next calls (integrations/mcp_pool.py):
# idle ones kept per connection (0: a fresh session per call), and for how long (seconds).
MCP_POOL_SESSIONS = _read("MCP_POOL_SESSIONS", _count, 16)
MCP_POOL_IDLE_TIMEOUT = _read("MCP_POOL_IDLE_TIMEOUT", _positive(float), 60.0)

# OAuth 2.1 to upstream MCP servers (integrations/oauth.py). Toolgate's redirect URI and its
# Client ID Metadata Document live under SITE_URL: /oauth/callback/, /oauth/client-metadata.json.
OAUTH_REFRESH_MARGIN = _read("OAUTH_REFRESH_MARGIN", _positive(int), 120)  # renew this early (s)
OAUTH_SIGN_IN_TIMEOUT = _read("OAUTH_SIGN_IN_TIMEOUT", _positive(int), 600)  # a browser sign-in (s)
OAUTH_MAX_RESPONSE_BYTES = 1024 * 1024  # metadata, registration and token responses

# Tool calls.
APPROVAL_TIMEOUT = _read("APPROVAL_TIMEOUT", _positive(int), 600)  # seconds a request may wait
TOOL_CALL_MAX_ATTEMPTS = _read("TOOL_CALL_MAX_ATTEMPTS", _positive(int), 4)
TOOL_CALL_REQUEUE_AFTER = _read("TOOL_CALL_REQUEUE_AFTER", _positive(int), 60)  # seconds
# A worker's time limit on one call (soft: the call fails with `timeout` and is never re-run;
# the hard limit, TASK_HARD_LIMIT_MARGIN later, kills the worker process, and the sweeper makes
# the call `unknown`). Above MCP_CALL_TIMEOUT, which normally ends a slow call first.
TOOL_CALL_TIME_LIMIT = _read("TOOL_CALL_TIME_LIMIT", _positive(int), int(MCP_CALL_TIMEOUT) + 30)
SYNC_TIME_LIMIT = _read("SYNC_TIME_LIMIT", _positive(int), int(MCP_SYNC_TIMEOUT) + 30)  # one sync
TASK_TIME_LIMIT = _read("TASK_TIME_LIMIT", _positive(int), 300)  # any other task (soft)
TASK_HARD_LIMIT_MARGIN = 15  # seconds from a task's soft time limit to its hard one
# A call still `running` this long after it started lost its worker: it becomes `unknown`. It
# must outlast the longest call still alive: a worker's, ended by its hard time limit, and one
# the web process runs for a waiting agent, which no worker limit bounds, only MCP_CALL_TIMEOUT
# (given the same margin, for its record). Sooner, a call still running would be handed to a
# human, and the result it then brings is not stored.
_LONGEST_CALL = max(TOOL_CALL_TIME_LIMIT, int(MCP_CALL_TIMEOUT)) + TASK_HARD_LIMIT_MARGIN
TOOL_CALL_LOST_AFTER = _read("TOOL_CALL_LOST_AFTER", _positive(int), _LONGEST_CALL + 45)
if TOOL_CALL_LOST_AFTER <= _LONGEST_CALL:
    raise ImproperlyConfigured(
        f"TOOL_CALL_LOST_AFTER ({TOOL_CALL_LOST_AFTER}) must be above the longest a call can "
        f"run ({_LONGEST_CALL} s: the larger of TOOL_CALL_TIME_LIMIT, a worker's, and "
        f"MCP_CALL_TIMEOUT, the web process's, plus {TASK_HARD_LIMIT_MARGIN}): else a call "
        "still running would be handed to a human."
    )
# How a process that finishes a call wakes the agents waiting for it in the web processes
# (approvals/wakeup.py): auto (Redis pub/sub on a Redis broker, else PostgreSQL LISTEN/NOTIFY,
# else a doorbell socket beside the SQLite file), redis, postgres, doorbell or poll (none).
TOOL_CALL_WAKEUP = _read(
    "TOOL_CALL_WAKEUP", _choice("auto", "redis", "postgres", "doorbell", "poll"), "auto"
)
CELERY_TASK_SOFT_TIME_LIMIT = TASK_TIME_LIMIT
CELERY_TASK_TIME_LIMIT = TASK_TIME_LIMIT + TASK_HARD_LIMIT_MARGIN
CELERY_TASK_ANNOTATIONS = {
    name: {"soft_time_limit": limit, "time_limit": limit + TASK_HARD_LIMIT_MARGIN}
    for name, limit in [
        ("approvals.tasks.run_tool_call", TOOL_CALL_TIME_LIMIT),
        ("integrations.tasks.sync_server", SYNC_TIME_LIMIT),
    ]
}
TOOL_CALL_RETENTION_DAYS = _read("TOOL_CALL_RETENTION_DAYS", _positive(int), 30)
SWEEP_INTERVAL = _read("SWEEP_INTERVAL", _positive(int), 30)  # seconds
API_MAX_BODY_BYTES = _read("API_MAX_BODY_BYTES", _positive(int), 1024 * 1024)
API_MAX_WAIT = 60  # seconds an agent may ask to wait for an outcome
# Off by default: a call run in the web process records its result, then replies. On, a small
# result goes to the waiting agent while its record is written (approvals/running.py): ~0.3-1
# ms less a call, but for that moment another process (a page, a worker, a second web process,
# a script reading the database) still reads the call `running` after its agent has the result.
REPLY_BEFORE_RECORD = _read("REPLY_BEFORE_RECORD", _bool, False)
# Checking a call's arguments against the tool's schema: its deadline (over it, the request is
# refused), and the threads of the web process that do it, away from the API's shared thread.
ARGUMENT_VALIDATION_TIMEOUT = _read("ARGUMENT_VALIDATION_TIMEOUT", _positive(float), 2.0)
ARGUMENT_VALIDATION_THREADS = _read("ARGUMENT_VALIDATION_THREADS", _positive(int), 4)
QUEUE_PAGE_SIZE = 100  # pending calls shown at once, oldest first
QUEUE_POLL_SECONDS = _read("QUEUE_POLL_SECONDS", _positive(int), 3)
HISTORY_PAGE_SIZE = 50
AGENT_RATE_LIMIT = _read("AGENT_RATE_LIMIT", _positive(int), 600)  # requests a minute per agent

# The MCP endpoint for agents (/mcp/).
# A held tools/call (a client without tasks, waiting for a human) is answered "still pending"
# after this many seconds: below the usual clients' 60 s request timeout.
MCP_APPROVAL_HOLD = _read("MCP_APPROVAL_HOLD", _positive(float), 50.0)
MCP_PROGRESS_INTERVAL = _read("MCP_PROGRESS_INTERVAL", _positive(float), 5.0)
# After a "still pending" answer, the client's repeat of the call gets the outcome of the call
# it was told about if that finished at most this many seconds before (once).
MCP_REATTACH_WINDOW = _read("MCP_REATTACH_WINDOW", _positive(int), 600)
MCP_LIST_CHANGED_INTERVAL = _read("MCP_LIST_CHANGED_INTERVAL", _positive(float), 5.0)
# Handshake-era sessions one agent may have open at once (every endpoint, this web process);
# well below the SDK's 10,000 for the process, which one agent must not be able to fill.
MCP_MAX_SESSIONS_PER_AGENT = _read("MCP_MAX_SESSIONS_PER_AGENT", _positive(int), 1000)
# Browser origins allowed to call the endpoint (DNS-rebinding protection); requests without an
# Origin header (every non-browser client) are allowed. Entries may end in ":*" (any port).
MCP_ALLOWED_ORIGINS = _read(
    "MCP_ALLOWED_ORIGINS",
    _list,
    [SITE_URL.rstrip("/"), *CSRF_TRUSTED_ORIGINS]
    + (["http://localhost:*", "http://127.0.0.1:*", "http://[::1]:*"] if DEBUG else []),
)

# Notifications to approvers (approvals/notifications.py, approvals/channels.py).
APPROVAL_REMINDER_AFTER = _read("APPROVAL_REMINDER_AFTER", _positive(int), 300)  # seconds pending
NOTIFY_BATCH_SECONDS = _read("NOTIFY_BATCH_SECONDS", _positive(int), 10)  # one message per window
NOTIFY_MAX_ATTEMPTS = _read("NOTIFY_MAX_ATTEMPTS", _positive(int), 5)  # tries per message
NOTIFY_RETRY_BACKOFF = _read("NOTIFY_RETRY_BACKOFF", _positive(int), 2)  # seconds, doubled each try
NOTIFY_TIMEOUT = _read("NOTIFY_TIMEOUT", _positive(float), 10.0)  # seconds per send
NOTIFY_SYNC_FAILURES = _read("NOTIFY_SYNC_FAILURES", _positive(int), 3)  # failed syncs in a row


# E-mail: EMAIL_URL such as smtp+tls://user:pass@host:587 (django-environ's schemes). Unset, a
# development machine prints mails on the console; a production one uses SMTP on localhost:25.
_email_default = env.email_url_config("consolemail://" if DEBUG else "smtp:")
_email = _read(
    "EMAIL_URL",
    lambda raw: env.email_url_config(_checked_url(raw, set(environ.Env.EMAIL_SCHEMES))),
    _email_default,
    secret=True,
)
EMAIL_BACKEND = _email["EMAIL_BACKEND"]
EMAIL_HOST = _email.get("EMAIL_HOST") or "localhost"
EMAIL_PORT = _email.get("EMAIL_PORT") or 25
EMAIL_HOST_USER = _email.get("EMAIL_HOST_USER") or ""
EMAIL_HOST_PASSWORD = _email.get("EMAIL_HOST_PASSWORD") or ""
EMAIL_USE_TLS = _email.get("EMAIL_USE_TLS", False)
EMAIL_USE_SSL = _email.get("EMAIL_USE_SSL", False)
EMAIL_FILE_PATH = _email.get("EMAIL_FILE_PATH") or str(VAR_DIR / "mail")
EMAIL_TIMEOUT = NOTIFY_TIMEOUT
DEFAULT_FROM_EMAIL = _read("DEFAULT_FROM_EMAIL", str, "Toolgate <toolgate@localhost>")
SERVER_EMAIL = DEFAULT_FROM_EMAIL


# Monitoring: the anomaly scan (approvals/anomalies.py) and /metrics (approvals/metrics.py).
def _divides_an_hour(raw):
    value = _positive(int)(raw)
    if 60 % value:
        raise ValueError("expected a number of minutes that divides 60 (1, 2, 5, 10, 15, 30, 60)")
    return value


ANOMALY_SCAN_INTERVAL = _read("ANOMALY_SCAN_INTERVAL", _positive(int), 300)  # seconds
ANOMALY_BASELINE_DAYS = _read("ANOMALY_BASELINE_DAYS", _positive(int), 7)
ANOMALY_MIN_HISTORY_DAYS = _read("ANOMALY_MIN_HISTORY_DAYS", _positive(int), 3)
ANOMALY_RATE_FACTOR = _read("ANOMALY_RATE_FACTOR", _positive(float), 3.0)
ANOMALY_RATE_MIN_CALLS = _read("ANOMALY_RATE_MIN_CALLS", _positive(int), 20)
ANOMALY_USUAL_HOUR_DAYS = _read("ANOMALY_USUAL_HOUR_DAYS", _positive(int), 2)
ANOMALY_BURST_MINUTES = _read("ANOMALY_BURST_MINUTES", _divides_an_hour, 10)
ANOMALY_REFUSAL_BURST = _read("ANOMALY_REFUSAL_BURST", _positive(int), 5)
ANOMALY_PERSONAL_DATA_MIN_CALLS = _read("ANOMALY_PERSONAL_DATA_MIN_CALLS", _positive(int), 5)
ANOMALY_ARGUMENTS_FACTOR = _read("ANOMALY_ARGUMENTS_FACTOR", _positive(float), 10.0)
ANOMALY_ARGUMENTS_MIN_BYTES = _read("ANOMALY_ARGUMENTS_MIN_BYTES", _positive(int), 2048)
ANOMALY_ARGUMENTS_MIN_BASELINE = _read("ANOMALY_ARGUMENTS_MIN_BASELINE", _positive(int), 20)
METRICS_TOKEN = _read("METRICS_TOKEN", str, "").strip()  # empty: /metrics answers 404
if METRICS_TOKEN and len(METRICS_TOKEN) < 16:
    raise ImproperlyConfigured("METRICS_TOKEN must be at least 16 characters (or unset).")

CELERY_BEAT_SCHEDULE = {
    "sync-mcp-servers": {
        "task": "integrations.tasks.sync_all_servers",
        "schedule": timedelta(seconds=MCP_SYNC_INTERVAL),
        # A run nobody picked up in time is dropped rather than piling up behind the next one.
        "options": {"expires": max(MCP_SYNC_INTERVAL - 5, 1)},
    },
    "purge-tool-call-data": {
        "task": "approvals.tasks.purge_tool_call_data",
        "schedule": timedelta(hours=1),
        "options": {"expires": 3500},
    },
    "detect-anomalies": {
        "task": "approvals.tasks.detect_anomalies",
        "schedule": timedelta(seconds=ANOMALY_SCAN_INTERVAL),
        "options": {"expires": max(ANOMALY_SCAN_INTERVAL - 5, 1)},
    },
    "update-metric-totals": {
        "task": "approvals.tasks.update_metric_totals",
        "schedule": timedelta(minutes=5),
        "options": {"expires": 290},
    },
    "sweep-tool-calls": {
        "task": "approvals.tasks.sweep_tool_calls",
        "schedule": timedelta(seconds=SWEEP_INTERVAL),
        "options": {"expires": max(SWEEP_INTERVAL - 1, 1)},
    },
    "remind-pending-calls": {
        "task": "approvals.tasks.remind_pending_calls",
        "schedule": timedelta(seconds=SWEEP_INTERVAL),
        "options": {"expires": max(SWEEP_INTERVAL - 1, 1)},
    },
    "resend-stalled-notifications": {
        "task": "approvals.tasks.resend_stalled_notifications",
        "schedule": timedelta(seconds=60),
        "options": {"expires": 55},
    },
}

DEFAULT_EXCEPTION_REPORTER_FILTER = "integrations.reporting.SafeExceptionReporterFilter"
LOG_LEVEL = _read("LOG_LEVEL", str, "INFO").upper()
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"redact": {"()": "integrations.logging.RedactSecretsFilter"}},
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain", "filters": ["redact"]}
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        # These log full request URLs at INFO/DEBUG, and a server URL is a secret.
        "httpx2": {"level": "WARNING"},
        "httpcore2": {"level": "WARNING"},
        "mcp": {"level": "WARNING"},
        "celery": {"level": LOG_LEVEL},
        # Django's own console handler would print request warnings a second time.
        "django": {"handlers": [], "level": LOG_LEVEL, "propagate": True},
    },
}
