"""`python -m tests.services DATABASE_URL REDIS_URL`: exit 0 when both answer.

Used by `make test` to decide whether to repeat the integration tests on PostgreSQL and Redis.
"""

import sys

import psycopg
import redis


def reachable(database_url, redis_url):
    try:
        psycopg.connect(database_url, connect_timeout=3).close()
        redis.Redis.from_url(redis_url, socket_connect_timeout=3).ping()
    except Exception as exc:
        print(f"Not reachable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return False
    return True


if __name__ == "__main__":
    sys.exit(0 if reachable(sys.argv[1], sys.argv[2]) else 1)
