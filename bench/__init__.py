"""Benchmarks of the agent API. Not tests: they print figures.

``python -m bench`` runs all of them and prints a summary; ``python -m bench latency`` or
``python -m bench waiters`` runs one. Each builds a throw-away Toolgate of its own (see
`bench.harness`): a temporary var dir with a fresh SQLite database and file broker, the demo
MCP server, the web server (uvicorn) and a Celery worker, all on 127.0.0.1, and tears it all
down at the end, also on Ctrl-C or failure. See bench/README.md for what each one measures.
"""
