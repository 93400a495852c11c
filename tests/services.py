"""`python -m tests.services DATABASE_URL REDIS_URL`: exit 0 when both answer.

Used by `make test` to decide whether to repeat the integration tests on PostgreSQL and Redis.
What it prints names the service and never the URL's password: a parser's own message can
quote part of one ("Port could not be cast to integer value as 'Pa55'" for an unencoded "/").
"""

import sys
from urllib.parse import unquote, urlsplit

import psycopg
import redis


def _postgres(url):
    psycopg.connect(url, connect_timeout=3).close()


def _redis(url):
    redis.Redis.from_url(url, socket_connect_timeout=3).ping()


def problem(name, check, url):
    """Why the service at `url` does not answer, without any of the URL's credentials; or None."""
    try:
        check(url)
    except ValueError:
        return f"{name}: its URL is malformed (not shown: it may hold a password)"
    except Exception as exc:
        return f"{name}: {type(exc).__name__}: {_without_credentials(str(exc), url)}"
    return None


def _without_credentials(text, url):
    userinfo = urlsplit(url).netloc.rpartition("@")[0]
    for secret in {userinfo, unquote(userinfo), *userinfo.split(":")[1:]} - {""}:
        text = text.replace(secret, "***")
    return text


def reachable(database_url, redis_url):
    problems = [
        problem("PostgreSQL", _postgres, database_url),
        problem("Redis", _redis, redis_url),
    ]
    for found in filter(None, problems):
        print(f"Not reachable: {found}", file=sys.stderr)
    return not any(problems)


if __name__ == "__main__":
    sys.exit(0 if reachable(sys.argv[1], sys.argv[2]) else 1)
