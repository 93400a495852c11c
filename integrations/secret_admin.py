"""No admin page renders a stored secret: one mechanism for every model with encrypted fields.

Every field whose type is one of `integrations.fields`' encrypted fields is a secret here (a
server's URL, token and headers, a tool call's arguments and result, and whatever later models
store encrypted). Django renders model fields in many places; each is closed here, for every
ModelAdmin and inline registered on the admin site (`config.admin.ToolgateAdminSite` applies
this to every registration, so a new model is covered without doing anything):

* read-only fields (what a user with only "view" permission sees on the change page, and
  `readonly_fields` for everybody) and `list_display` columns show "Stored (hidden)" or "—"
  instead of the value, through a display function put in the field's place;
* form fields (change and add pages, `list_editable`, inline forms) get a widget that never
  renders a value, neither the stored one nor what was just posted; a form that doesn't handle
  its secret fields itself keeps the stored value when the field is left blank. The one
  exception is a widget a form declares with `echoes_typed_value` (the server URL): it shows
  back what was typed into the POST being answered, so a refused form needn't be retyped, and
  still never a stored value (the stored value is dropped from the form's `initial` here);
* `list_filter` (which would list every distinct value) and `search_fields` leave encrypted
  fields out, and so does `list_editable`.

What this can't reach is a model's `__str__`, shown in titles, breadcrumbs, delete pages and
the admin log: it must not include an encrypted field. `tests/test_admin_secrets.py` walks
every admin page of every model with encrypted fields, as every kind of staff user, and fails
on any secret it sees, `__str__` included.
"""

import functools

from django.contrib import admin
from django.forms import ModelForm

from integrations.fields import EncryptedTextField

HIDDEN_SUFFIX = "__hidden"


def secret_field_names(model):
    """Names of the model's fields stored encrypted (EncryptedTextField and its subclasses)."""
    return {f.name for f in model._meta.get_fields() if isinstance(f, EncryptedTextField)}


def _display(model, name):
    """The read-only stand-in for the secret field `name`: whether a value is stored."""
    field = model._meta.get_field(name)

    @admin.display(description=field.verbose_name)
    def shown(self, obj):
        return "Stored (hidden)" if getattr(obj, name) not in (None, "", {}, []) else "—"

    shown.__name__ = name + HIDDEN_SUFFIX
    return shown


def _stand_in(secrets, name):
    return name + HIDDEN_SUFFIX if isinstance(name, str) and name in secrets else name


def _in_fieldsets(fieldsets, replace):
    """`fieldsets` with each field name passed through `replace` (nested tuples kept)."""

    def line(entry):
        if isinstance(entry, list | tuple):
            return type(entry)(replace(name) for name in entry)
        return replace(entry)

    return [
        (title, {**options, "fields": [line(entry) for entry in options.get("fields", ())]})
        for title, options in fieldsets
    ]


class _WriteOnlyWidget:
    """Mixed into a field's widget class: the value is never rendered back."""

    def format_value(self, value):
        return None

    def get_context(self, name, value, attrs):
        return super().get_context(name, None, attrs)


@functools.cache
def _write_only_class(widget_class):
    if issubclass(widget_class, _WriteOnlyWidget):
        return widget_class
    return type(f"WriteOnly{widget_class.__name__}", (_WriteOnlyWidget, widget_class), {})


def _secret_form(form_class, secrets):
    """`form_class` with write-only widgets for the secret fields; fields it didn't declare
    itself (model-generated ones) keep the stored value when left blank."""

    class SecretForm(form_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            stored = self.instance.pk is not None if isinstance(self, ModelForm) else False
            for name in secrets & set(self.fields):
                field = self.fields[name]
                if not getattr(field.widget, "echoes_typed_value", False):
                    field.widget.__class__ = _write_only_class(field.widget.__class__)
                self.initial.pop(name, None)
                if stored and name not in form_class.declared_fields:
                    field.required = False
                    field.help_text = (
                        f"{field.help_text} Stored encrypted, never shown: leave blank to keep it."
                    ).strip()

        def _post_clean(self):
            if self.instance.pk is not None:
                for name in (secrets & set(self.fields)) - set(form_class.declared_fields):
                    if self.cleaned_data.get(name) in (None, "", {}, []):
                        self.cleaned_data[name] = getattr(self.instance, name)
            super()._post_clean()

    SecretForm.__name__ = SecretForm.__qualname__ = form_class.__name__
    return SecretForm


class _HidesSecrets:
    """The parts shared by ModelAdmin and inlines."""

    @property
    def _secrets(self):
        return secret_field_names(self.model)

    def _read_only_now(self, request, obj):
        """Field names rendered read-only on this page: all of them for a view-only user."""
        if obj is not None and not self.has_change_permission(request, obj):
            return None  # every field
        return set(super().get_readonly_fields(request, obj))

    def get_readonly_fields(self, request, obj=None):
        fields = super().get_readonly_fields(request, obj)
        return [_stand_in(self._secrets, name) for name in fields]

    def get_fieldsets(self, request, obj=None):
        fieldsets = super().get_fieldsets(request, obj)
        read_only, secrets = self._read_only_now(request, obj), self._secrets
        if not secrets:
            return fieldsets

        def replace(name):
            if read_only is None or name in read_only:
                return _stand_in(secrets, name)
            return name

        return _in_fieldsets(fieldsets, replace)

    def formfield_for_dbfield(self, db_field, request, **kwargs):
        formfield = super().formfield_for_dbfield(db_field, request, **kwargs)
        if formfield is not None and db_field.name in self._secrets:
            formfield.widget.__class__ = _write_only_class(formfield.widget.__class__)
        return formfield


class SecretsHiddenInline(_HidesSecrets):
    def get_formset(self, request, obj=None, **kwargs):
        formset = super().get_formset(request, obj, **kwargs)
        if self._secrets:
            formset.form = _secret_form(formset.form, self._secrets)
        return formset


class SecretsHiddenAdmin(_HidesSecrets):
    def get_form(self, request, obj=None, **kwargs):
        form = super().get_form(request, obj, **kwargs)
        return _secret_form(form, self._secrets) if self._secrets else form

    def get_changelist_form(self, request, **kwargs):
        form = super().get_changelist_form(request, **kwargs)
        return _secret_form(form, self._secrets) if self._secrets else form

    def get_list_display(self, request):
        return [_stand_in(self._secrets, name) for name in super().get_list_display(request)]

    def get_list_display_links(self, request, list_display):
        links = super().get_list_display_links(request, list_display)
        return links and [_stand_in(self._secrets, name) for name in links]

    def get_list_filter(self, request):
        return [f for f in super().get_list_filter(request) if _field_name(f) not in self._secrets]

    def get_search_fields(self, request):
        fields = super().get_search_fields(request)
        return [f for f in fields if f.lstrip("^=@").split("__")[0] not in self._secrets]

    def get_inlines(self, request, obj):
        return [hide_secrets_inline(inline) for inline in super().get_inlines(request, obj)]


def _field_name(list_filter):
    if isinstance(list_filter, str):
        return list_filter.split("__")[0]
    if isinstance(list_filter, list | tuple):
        return _field_name(list_filter[0])
    return None  # a SimpleListFilter class decides for itself


@functools.cache
def hide_secrets_inline(inline_class):
    """`inline_class` behind the mechanism above."""
    if issubclass(inline_class, _HidesSecrets):
        return inline_class
    secrets = secret_field_names(inline_class.model)
    attributes = {name + HIDDEN_SUFFIX: _display(inline_class.model, name) for name in secrets}
    return type(inline_class.__name__, (SecretsHiddenInline, inline_class), attributes)


def hide_secrets(model, admin_class):
    """The ModelAdmin class `admin_class`, registered for `model`, behind the mechanism."""
    if issubclass(admin_class, _HidesSecrets):
        return admin_class
    secrets = secret_field_names(model)
    attributes = {name + HIDDEN_SUFFIX: _display(model, name) for name in secrets}
    attributes["list_editable"] = [n for n in admin_class.list_editable if n not in secrets]
    return type(admin_class.__name__, (SecretsHiddenAdmin, admin_class), attributes)
