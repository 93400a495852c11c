"""Who an agent is and how fast it may go: shared by the JSON API and the MCP endpoint, so
both accept the same token and count against the same per-agent rate limit."""

from django.conf import settings
from django.core.cache import cache
from django.utils import timezone

from integrations.models import Agent


def agent_for(authorization):
    """The active agent whose token is in an `Authorization: Bearer …` header value, or None."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return Agent.authenticate(token.strip())


def rate_limited(agent):
    """Count one request; seconds to wait if the agent used up this minute's requests, else 0."""
    now = timezone.now()
    key = f"rate:{agent.pk}:{now:%Y%m%d%H%M}"
    cache.add(key, 0, timeout=90)
    if cache.incr(key) > settings.AGENT_RATE_LIMIT:
        return 60 - now.second
    return 0


def touch(agent):
    """Record that the agent was seen, at most once a minute (one UPDATE)."""
    now = timezone.now()
    if agent.last_used_at is None or (now - agent.last_used_at).total_seconds() > 60:
        Agent.objects.filter(pk=agent.pk).update(last_used_at=now)
