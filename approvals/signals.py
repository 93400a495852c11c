"""Pending calls the policy no longer allows are cancelled as soon as that happens: when an agent
is deactivated or a server is taken away from it, however that is done (the admin, `manage.py
agent`, code). The approval and run time checks would refuse them anyway; cancelling tells the
agent and the approvers at once, with the reason."""

from django.db.models.signals import m2m_changed, post_save
from django.dispatch import receiver

from integrations.models import Agent


def _cancel_refused(pending):
    from approvals.models import Status

    for call in pending.filter(status=Status.PENDING_APPROVAL):
        call.cancel_if_refused()


@receiver(post_save, sender=Agent, dispatch_uid="approvals.cancel_calls_of_inactive_agent")
def cancel_calls_of_inactive_agent(sender, instance, **kwargs):
    from approvals.models import ToolCall

    if not instance.is_active:
        _cancel_refused(ToolCall.objects.filter(agent=instance))


@receiver(
    m2m_changed, sender=Agent.servers.through, dispatch_uid="approvals.cancel_calls_of_servers"
)
def cancel_calls_of_removed_servers(sender, instance, action, reverse, pk_set, **kwargs):
    from approvals.models import ToolCall

    if action not in ("post_remove", "post_clear"):
        return
    mine, theirs = ("server", "agent_id__in") if reverse else ("agent", "server_id__in")
    pending = ToolCall.objects.filter(**{mine: instance})
    if pk_set:
        pending = pending.filter(**{theirs: pk_set})
    _cancel_refused(pending)
