"""The "Approvers" group: members may decide tool calls on the queue page."""

from django.contrib.auth.management import create_permissions
from django.db import migrations


def create_group(apps, schema_editor):
    # Permissions are normally created after all migrations; make sure ours exists now.
    for app_config in apps.get_app_configs():
        app_config.models_module = True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = None
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    group, _ = Group.objects.get_or_create(name="Approvers")
    group.permissions.add(
        Permission.objects.get(codename="decide_toolcall", content_type__app_label="approvals"),
        Permission.objects.get(codename="view_toolcall", content_type__app_label="approvals"),
    )


def remove_group(apps, schema_editor):
    apps.get_model("auth", "Group").objects.filter(name="Approvers").delete()


class Migration(migrations.Migration):
    dependencies = [
        ("approvals", "0001_initial"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(create_group, remove_group)]
