"""Who changed the policy: Django's admin log (`LogEntry`), written for every policy change.

The admin's own add/change/delete forms write their entries themselves (with messages that
name old and new values: `PolicyChangeMessages` in integrations/admin.py). Everything else
that changes the policy writes one here: bulk actions, "mark reviewed", "approve and always
allow", and the management commands, which log as `--user` or as the inactive user
"manage.py" (`system_user()`). Messages are plain sentences, and never hold a secret.
"""

from django import forms
from django.contrib.admin.models import ADDITION, CHANGE, DELETION, LogEntry
from django.contrib.auth import get_user_model
from django.core.management.base import CommandError

__all__ = ["ADDITION", "CHANGE", "DELETION", "command_user", "log_change", "system_user"]

SYSTEM_USERNAME = "manage.py"


def log_change(user, obj, message, action=CHANGE):
    """One admin-log entry: `user` did `action` to `obj`, saying `message`."""
    LogEntry.objects.log_actions(
        user_id=user.pk, queryset=[obj], action_flag=action, change_message=message
    )


def system_user():
    """The user that management commands log as when no `--user` is given: it can't log in."""
    user, created = get_user_model().objects.get_or_create(
        username=SYSTEM_USERNAME, defaults={"is_active": False}
    )
    if created:
        user.set_unusable_password()
        user.save(update_fields=["password"])
    return user


def command_user(username):
    """The user a management command acts as: `--user NAME`, or the system user."""
    if not username:
        return system_user()
    user = get_user_model().objects.filter(username=username).first()
    if user is None:
        raise CommandError(f"No user named {username!r} (for --user).")
    return user


def describe_form(form, secret_fields=(), add=False):
    """What a saved admin form changed, as sentences with the old and new values ("Changed
    approval mode: Always Ask (Recommended) → No Approval."). Secret fields are named, never
    shown. On an addition, the values it was added with."""
    names = form.fields if add else form.changed_data
    parts = []
    for name in names:
        field = form.fields[name]
        label = str(field.label or name).lower()
        if name in secret_fields:
            if name in form.changed_data:
                parts.append(f"Set {label} (not shown).")
            continue
        after = _shown(field, form.cleaned_data.get(name))
        if add:
            if after != "—":
                parts.append(f"{label}: {after}")
        else:
            before = _shown(field, form.initial.get(name))
            parts.append(f"Changed {label}: {before} → {after}.")
    if add:
        return "Added with " + "; ".join(parts) + "." if parts else "Added."
    return " ".join(parts)


def _shown(field, value):
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None or value == "":
        return "—"
    if isinstance(field, forms.ModelMultipleChoiceField):
        return ", ".join(sorted(str(item) for item in value)) or "none"
    if isinstance(field, forms.ModelChoiceField):  # the form's initial value is a primary key
        found = value if hasattr(value, "pk") else field.queryset.filter(pk=value).first()
        return str(found or value)
    if isinstance(field, forms.ChoiceField):
        return str(dict(field.choices).get(value, value))
    text = str(value)
    return text if len(text) <= 200 else text[:199] + "…"
