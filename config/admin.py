"""Toolgate's admin site: Django's, with every registration behind the one mechanism that keeps
stored secrets out of every admin page (integrations/secret_admin.py)."""

from django.contrib import admin
from django.db.models.base import ModelBase

from integrations.secret_admin import hide_secrets


class ToolgateAdminSite(admin.AdminSite):
    site_header = "Toolgate"
    site_title = "Toolgate"
    index_title = "MCP servers, tools and agents"
    # The lists need the width (at 1280 px the sidebar hid their most important columns); the
    # breadcrumbs and the index lead everywhere the sidebar did.
    enable_nav_sidebar = False

    def register(self, model_or_iterable, admin_class=None, **options):
        models = (
            [model_or_iterable] if isinstance(model_or_iterable, ModelBase) else model_or_iterable
        )
        for model in models:
            model_admin = admin_class or admin.ModelAdmin
            if options:  # register(Model, **options) builds the class Django's way
                model_admin = type(f"{model.__name__}Admin", (model_admin,), options)
            super().register(model, hide_secrets(model, model_admin))
