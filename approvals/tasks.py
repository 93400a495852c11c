"""Celery tasks for tool calls. They take a primary key and are safe to receive twice: the
call is claimed with a conditional UPDATE, so a redelivered message finds nothing to do."""

import random

from celery import shared_task

from approvals.models import ToolCall


@shared_task(bind=True, max_retries=None)
def run_tool_call(self, call_id):
    call = ToolCall.objects.filter(pk=call_id).first()
    if call is None:
        return
    if call.run():
        # The request provably never reached the server: try again later, with jitter. The
        # number of attempts is bounded by TOOL_CALL_MAX_ATTEMPTS on the call itself.
        countdown = min(2**call.attempts, 60) + random.uniform(0, 1)  # noqa: S311
        raise self.retry(countdown=countdown)


@shared_task
def sweep_tool_calls():
    return ToolCall.sweep()


@shared_task
def purge_tool_call_data():
    return ToolCall.purge_old_data()
