"""The notification channel form, shared by the admin and the `notification_channel` command so
both apply the same rules. The URL and the signing secret are write-only: a stored value is
never rendered back, and leaving the field blank keeps it."""

import re

from django import forms
from django.core.exceptions import ValidationError
from django.core.validators import validate_email

from approvals.notifications import EVENTS, ChannelKind, NotificationChannel
from integrations import netguard
from integrations.forms import SecretWidget

MIN_SECRET_LENGTH = 16


def parse_recipients(text):
    addresses = [item.strip() for item in re.split(r"[,;\s]+", text) if item.strip()]
    errors = []
    for address in addresses:
        try:
            validate_email(address)
        except ValidationError:
            errors.append(f"“{address[:80]}” is not an e-mail address.")
    if errors:
        raise ValidationError(errors)
    return list(dict.fromkeys(addresses))


class NotificationChannelForm(forms.ModelForm):
    recipients_text = forms.CharField(
        label="E-mail addresses",
        required=False,
        widget=forms.Textarea(attrs={"rows": 2, "cols": 60}),
        help_text="For e-mail channels: one or more addresses, separated by commas or lines.",
    )
    url = forms.CharField(
        label="URL",
        required=False,
        widget=SecretWidget(attrs={"size": 60}),
        help_text="For Slack (its incoming-webhook URL) and webhooks. A secret: stored "
        "encrypted and never shown again.",
    )
    secret = forms.CharField(
        label="Signing secret",
        required=False,
        widget=SecretWidget(attrs={"size": 60}),
        help_text=f"For webhooks: at least {MIN_SECRET_LENGTH} characters, shared with the "
        "receiver, which checks X-Toolgate-Signature with it. Stored encrypted, never shown.",
    )
    events = forms.MultipleChoiceField(
        choices=list(EVENTS.items()), widget=forms.CheckboxSelectMultiple
    )

    class Meta:
        model = NotificationChannel
        fields = [
            "name",
            "kind",
            "recipients_text",
            "url",
            "secret",
            "events",
            "servers",
            "agents",
            "enabled",
            "include_arguments",
            "allow_private_network",
            "allow_http",
        ]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name in ("url", "secret"):  # never carry the decrypted values into the page
            self.initial.pop(name, None)
        self.initial.setdefault("recipients_text", ", ".join(self.instance.recipients or []))
        if self.instance.url:
            self.fields[
                "url"
            ].help_text = (
                f"Stored: {self.instance.origin}/… (the rest is hidden). Leave blank to keep it."
            )
        if self.instance.secret:
            self.fields["secret"].help_text = "A secret is stored. Leave blank to keep it."

    def clean_recipients_text(self):
        return parse_recipients(self.cleaned_data["recipients_text"])

    def clean_url(self):
        return self.cleaned_data["url"].strip() or self.instance.url

    def clean_secret(self):
        secret = self.cleaned_data["secret"].strip()
        if secret and len(secret) < MIN_SECRET_LENGTH:
            raise ValidationError(f"Use at least {MIN_SECRET_LENGTH} characters.")
        return secret or self.instance.secret

    def clean(self):
        cleaned = super().clean()
        kind = cleaned.get("kind")
        if kind == ChannelKind.EMAIL:
            if not cleaned.get("recipients_text") and "recipients_text" not in self.errors:
                self.add_error("recipients_text", "Enter at least one e-mail address.")
        elif kind in (ChannelKind.SLACK, ChannelKind.WEBHOOK):
            self._clean_url(cleaned)
        needs_secret = kind == ChannelKind.WEBHOOK and "secret" not in self.errors
        if needs_secret and not cleaned.get("secret"):
            self.add_error("secret", "A webhook needs a signing secret.")
        return cleaned

    def _clean_url(self, cleaned):
        url = cleaned.get("url")
        if not url:
            self.add_error("url", "Enter the URL.")
            return
        try:
            netguard.validate_url(url, allow_http=cleaned.get("allow_http", False))
        except netguard.UrlRefused as exc:
            # The reason, not what it quotes: the URL is a secret.
            self.add_error("url", re.sub(r"""(['"]).*\1""", "…", str(exc), flags=re.DOTALL))

    def save(self, commit=True):
        channel = super().save(commit=False)
        data = self.cleaned_data
        channel.recipients = data["recipients_text"] if channel.kind == ChannelKind.EMAIL else []
        channel.url = data["url"] if channel.kind != ChannelKind.EMAIL else ""
        channel.secret = data["secret"] if channel.kind == ChannelKind.WEBHOOK else ""
        if commit:
            channel.save()
            self.save_m2m()
        return channel
