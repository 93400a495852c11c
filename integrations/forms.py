"""The MCP server form, shared by the admin and the `mcp_server` command so both apply the
same rules. Secrets are write-only: a stored value is never rendered back."""

import re

from django import forms
from django.core.exceptions import ValidationError

from integrations import netguard
from integrations.models import McpServer

HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # an HTTP token (RFC 9110)

# Headers Toolgate itself controls: letting a server's settings override them would break the
# transport or smuggle a second request.
RESERVED_HEADERS = {
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "proxy-authorization",
    "accept",
    "cookie",
    "mcp-session-id",
    "mcp-protocol-version",
    "last-event-id",
}


def parse_headers(text):
    """Parse "Name: value" lines into a dict, raising ValidationError with every problem."""
    headers, errors = {}, []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        name, sep, value = line.partition(":")
        name, value = name.strip(), value.strip()
        if not sep or not name:
            errors.append(f"Line {number}: expected “Name: value”.")
        elif not HEADER_NAME.match(name):
            errors.append(f"Line {number}: “{name[:40]}” is not a valid header name.")
        elif name.lower() in RESERVED_HEADERS:
            errors.append(f"Line {number}: {name} is set by Toolgate and can't be overridden.")
        elif any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in value):
            errors.append(f"Line {number}: the value of {name} contains control characters.")
        elif not value.isascii():  # the HTTP client sends header values as ASCII only
            errors.append(f"Line {number}: the value of {name} must be plain ASCII.")
        elif name.lower() in {h.lower() for h in headers}:
            errors.append(f"Line {number}: {name} is given twice.")
        else:
            headers[name] = value
    if errors:
        raise ValidationError(errors)
    return headers


def describe_errors(form):
    """A bound form's errors as lines for a management command: "field: message"."""
    return [
        f"{'' if field == '__all__' else field.removesuffix('_text') + ': '}{message}"
        for field, messages in form.errors.items()
        for message in messages
    ]


class SecretWidget(forms.PasswordInput):
    """Never renders the stored value; says whether one is stored."""

    def __init__(self, attrs=None):
        super().__init__(attrs={"autocomplete": "off", **(attrs or {})}, render_value=False)


class SecretTextarea(forms.Textarea):
    """A textarea that never renders a value back, not even what was just submitted."""

    def format_value(self, value):
        return None


class McpServerForm(forms.ModelForm):
    # Never shown anywhere, not even in the admin log's messages (integrations/audit.py).
    secret_fields = ["url", "secret_token", "clear_secret_token", "headers_text", "clear_headers"]

    url = forms.CharField(
        label="Server URL",
        required=False,
        widget=SecretWidget(attrs={"size": 60}),
        help_text="May contain a secret key. Stored encrypted and never shown again; "
        "leave blank to keep the stored URL.",
    )
    secret_token = forms.CharField(
        label="Secret token (optional)",
        required=False,
        widget=SecretWidget(attrs={"size": 60}),
        help_text="Sent as “Authorization: Bearer …”. Leave blank to keep the stored token.",
    )
    clear_secret_token = forms.BooleanField(label="Remove the stored token", required=False)
    headers_text = forms.CharField(
        label="HTTP headers (optional)",
        required=False,
        widget=SecretTextarea(attrs={"rows": 3, "cols": 60, "autocomplete": "off"}),
        help_text="One “Name: value” per line. Values are stored encrypted and never shown; "
        "leave blank to keep the stored headers.",
    )
    clear_headers = forms.BooleanField(label="Remove the stored headers", required=False)

    class Meta:
        model = McpServer
        fields = [
            "name",
            "description",
            "url",
            "transport",
            "secret_token",
            "clear_secret_token",
            "headers_text",
            "clear_headers",
            "approval_mode",
            "personal_data_needs_approval",
            "enabled",
            "allow_private_network",
            "allow_http",
        ]
        widgets = {"approval_mode": forms.RadioSelect}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Unbound form fields must never carry the decrypted values into the page.
        for name in ("url", "secret_token", "headers_text"):
            self.initial.pop(name, None)
        if self.instance.pk:
            self.fields["url"].help_text = (
                f"Stored: {self.instance.origin}/… (the rest is hidden). "
                + self.fields["url"].help_text
            )
            stored_headers = sorted(self.instance.headers or {})
            if stored_headers:
                self.fields["headers_text"].help_text = (
                    "Stored: "
                    + ", ".join(stored_headers)
                    + ". "
                    + self.fields["headers_text"].help_text
                )
            if self.instance.secret_token:
                self.fields["secret_token"].help_text = (
                    "A token is stored. " + self.fields["secret_token"].help_text
                )
        else:
            self.fields["url"].required = True
            self.fields[
                "url"
            ].help_text = "May contain a secret key. Stored encrypted, never shown."

    def clean_url(self):
        url = self.cleaned_data["url"].strip()
        if not url:
            if self.instance.pk:
                return self.instance.url
            raise ValidationError("Enter the server URL.")
        return url

    def clean_secret_token(self):
        token = self.cleaned_data["secret_token"].strip()
        if any(ord(c) < 33 or ord(c) == 127 for c in token):
            raise ValidationError("The token can't contain spaces or control characters.")
        if not token.isascii():  # it is sent in a header, and header values are ASCII only
            raise ValidationError("The token must be plain ASCII.")
        return token

    def clean_headers_text(self):
        return parse_headers(self.cleaned_data["headers_text"])

    def clean(self):
        cleaned = super().clean()
        url = cleaned.get("url")
        if url:
            try:
                netguard.validate_url(url, allow_http=cleaned.get("allow_http", False))
            except netguard.UrlRefused as exc:
                # Keep the reason, not what it quotes: Python's URL parser quotes the port, or
                # the whole netloc with any password in it.
                self.add_error("url", re.sub(r"""(['"]).*\1""", "…", str(exc), flags=re.DOTALL))
        headers = cleaned.get("headers_text") or {}
        if "authorization" in {name.lower() for name in headers} and self._token_after_save():
            self.add_error(
                "headers_text", "Authorization is set by the secret token; remove one of them."
            )
        return cleaned

    def _token_after_save(self):
        if self.cleaned_data.get("clear_secret_token"):
            return bool(self.cleaned_data.get("secret_token"))
        return bool(self.cleaned_data.get("secret_token") or self.instance.secret_token)

    def save(self, commit=True):
        server = super().save(commit=False)
        data = self.cleaned_data
        if data.get("secret_token"):
            server.secret_token = data["secret_token"]
        elif data.get("clear_secret_token"):
            server.secret_token = ""
        if data.get("headers_text"):
            server.headers = data["headers_text"]
        elif data.get("clear_headers"):
            server.headers = {}
        if commit:
            server.save()
        return server

    def _post_clean(self):
        # ModelForm would copy the blank secret_token into the instance before save() decides
        # whether to keep the stored one; put the stored value back first.
        stored_token = self.instance.secret_token
        super()._post_clean()
        self.instance.secret_token = stored_token
