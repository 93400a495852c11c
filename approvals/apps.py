from django.apps import AppConfig
from django.db.models.signals import post_migrate


def ensure_approvers_group(sender, using="default", **kwargs):
    """Keep the "Approvers" group (made by migration 0002) after a database flush, which
    empties it but re-runs post_migrate; harmless when it exists."""
    from django.contrib.auth.models import Group, Permission

    decide = Permission.objects.using(using).filter(
        codename__in=["decide_toolcall", "view_toolcall"], content_type__app_label="approvals"
    )
    group, _ = Group.objects.using(using).get_or_create(name="Approvers")
    group.permissions.add(*decide)


class ApprovalsConfig(AppConfig):
    name = "approvals"
    verbose_name = "Approvals"

    def ready(self):
        # Connected for this app only, so it runs after auth has created the permissions.
        post_migrate.connect(ensure_approvers_group, sender=self)
        from approvals import signals  # noqa: F401 - connects the receivers
