"""Open upstream sessions of a server are closed when it is edited or deleted
(integrations/mcp_pool.py): the next call connects with the settings as they are now."""

from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from integrations import mcp_pool
from integrations.models import McpServer

# What a sync writes; saving only these leaves the server's connection as it was.
_SYNC_FIELDS = {
    "sync_state", "sync_started_at", "last_synced_at", "last_error", "sync_failures",
    "failed_syncs_total", "server_info",
}  # fmt: skip


@receiver(post_save, sender=McpServer, dispatch_uid="integrations.drop_pooled_sessions")
def drop_pooled_sessions(sender, instance, update_fields=None, **kwargs):
    if update_fields is None or not set(update_fields) <= _SYNC_FIELDS:
        mcp_pool.drop_server(instance.pk)


@receiver(post_delete, sender=McpServer, dispatch_uid="integrations.drop_pooled_sessions_gone")
def drop_pooled_sessions_of_deleted(sender, instance, **kwargs):
    mcp_pool.drop_server(instance.pk)
