from django.contrib.admin.apps import AdminConfig


class ToolgateAdminConfig(AdminConfig):
    """django.contrib.admin with Toolgate's admin site as the default `admin.site`."""

    default_site = "config.admin.ToolgateAdminSite"
