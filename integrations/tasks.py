"""Celery tasks for MCP servers. Thin: they take a primary key, re-fetch, and call the model."""

import logging

from celery import shared_task

from integrations.models import McpServer

logger = logging.getLogger(__name__)


@shared_task
def sync_server(server_id):
    server = McpServer.objects.filter(pk=server_id).first()
    if server is None:
        return  # deleted since the sync was requested
    result = server.sync_tools()
    logger.info("Synced MCP server %s: %s", server.name, result)


@shared_task
def sync_all_servers():
    for server in McpServer.objects.filter(enabled=True).only("pk"):
        server.request_sync()


@shared_task
def revoke_oauth_tokens(revocation_id):
    from integrations.oauth import OAuthRevocation

    revocation = OAuthRevocation.objects.filter(pk=revocation_id).first()
    if revocation is not None:  # else: sent already (a message delivered twice)
        revocation.send()
