"""The link to the approval queue, with the pending count, in the admin's and the approvers'
headers. Nothing is queried unless the page shows the link."""

from functools import cached_property

from approvals.models import Status, ToolCall
from approvals.views import DECIDE


class ApprovalQueue:
    def __init__(self, user):
        self.user = user

    @cached_property
    def visible(self):
        """Only approvers get the link: for others the queue is a 403."""
        return bool(self.user and self.user.is_authenticated and self.user.has_perm(DECIDE))

    @cached_property
    def pending(self):
        return ToolCall.objects.filter(status=Status.PENDING_APPROVAL).count()


def approval_queue(request):
    return {"approval_queue": ApprovalQueue(getattr(request, "user", None))}
