"""The MCP server form, shared by the admin and the `mcp_server` command so both apply the
same rules. Secrets are write-only: a stored value is never rendered back."""

import re

from django import forms
from django.conf import settings
from django.core.exceptions import ValidationError

from integrations import netguard
from integrations.models import AuthKind, McpServer
from integrations.oauth import ClientSource, Grant, OAuthCredential, redirect_uri

SCOPE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+( [\x21\x23-\x5b\x5d-\x7e]+)*$")  # RFC 6749 §3.3
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

    def __init__(self, attrs=None, render_value=False):
        super().__init__(attrs={"autocomplete": "off", **(attrs or {})}, render_value=render_value)


def typed_secret_widget(attrs=None):
    """A password input that shows back only what was typed into the POST being answered (a
    refused form keeps the URL the admin typed). The form never holds a stored value to show:
    `McpServerForm.__init__` drops it from `initial`, and a blank field means "keep it"."""
    widget = SecretWidget(attrs, render_value=True)
    widget.echoes_typed_value = True  # integrations/secret_admin.py lets it show the POST back
    return widget


class SecretTextarea(forms.Textarea):
    """A textarea that never renders a value back, not even what was just submitted."""

    def format_value(self, value):
        return None


class McpServerForm(forms.ModelForm):
    # Never shown anywhere, not even in the admin log's messages (integrations/audit.py).
    secret_fields = [
        "url", "secret_token", "clear_secret_token", "headers_text", "clear_headers",
        "oauth_client_secret", "clear_oauth_client_secret",
    ]  # fmt: skip

    url = forms.CharField(
        label="Server URL",
        required=False,
        widget=typed_secret_widget(attrs={"size": 60}),
        help_text="May contain a secret key. Stored encrypted and never shown again.",
    )
    secret_token = forms.CharField(
        label="Secret token (optional)",
        required=False,
        widget=SecretWidget(attrs={"size": 60}),
        help_text="Sent as “Authorization: Bearer …”. Stored encrypted and never shown.",
    )
    clear_secret_token = forms.BooleanField(label="Remove the stored token", required=False)
    headers_text = forms.CharField(
        label="HTTP headers (optional)",
        required=False,
        widget=SecretTextarea(attrs={"rows": 3, "cols": 60, "autocomplete": "off"}),
        help_text="One “Name: value” per line. Values are stored encrypted and never shown.",
    )
    clear_headers = forms.BooleanField(label="Remove the stored headers", required=False)
    oauth_grant = forms.ChoiceField(
        label="OAuth grant", choices=Grant.choices, initial=Grant.AUTHORIZATION_CODE,
        required=False, widget=forms.RadioSelect,
    )  # fmt: skip
    oauth_client_id = forms.CharField(
        label="Client ID (optional)",
        required=False,
        max_length=500,
        widget=forms.TextInput(attrs={"size": 60, "autocomplete": "off"}),
        help_text="A client registered for Toolgate at the authorization server. Leave blank to "
        "let Toolgate identify itself (its client metadata document, or dynamic registration).",
    )
    oauth_client_secret = forms.CharField(
        label="Client secret (optional)",
        required=False,
        widget=SecretWidget(attrs={"size": 60}),
        help_text="Of that client. Stored encrypted, sent only to the token endpoint.",
    )
    clear_oauth_client_secret = forms.BooleanField(
        label="Remove the stored client secret", required=False
    )
    oauth_scope = forms.CharField(
        label="Scopes (optional)",
        required=False,
        max_length=1000,
        widget=forms.TextInput(attrs={"size": 60}),
        help_text="Space-separated. Leave blank to ask for what the server says it needs.",
    )
    oauth_issuer = forms.CharField(
        label="Authorization server (optional)",
        required=False,
        max_length=500,
        widget=forms.TextInput(attrs={"size": 60}),
        help_text="Its issuer URL. When set, Toolgate signs in only there, whatever the MCP "
        "server names; recommended with a client secret.",
    )

    # How an error names the option that would allow what was refused; the `mcp_server add`
    # command names its flags instead.
    OPTION_HINTS = {
        "allow_http": "tick “Allow plain HTTP”",
        "allow_private_network": "tick “Allow private network”",
    }

    class Meta:
        model = McpServer
        fields = [
            "name",
            "description",
            "url",
            "transport",
            "auth_kind",
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
        widgets = {"approval_mode": forms.RadioSelect, "auth_kind": forms.RadioSelect}
        help_texts = {
            "auth_kind": "OAuth 2.1: Toolgate signs in at the server's authorization server "
            "(Connect, on this page once saved) and keeps the token fresh.",
        }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Unbound form fields must never carry the decrypted values into the page.
        for name in ("url", "secret_token", "headers_text"):
            self.initial.pop(name, None)
        if "auth_kind" in self.fields:  # not when the admin shows the form read-only
            self.fields["auth_kind"].required = False  # older scripts: inferred from the token
        self.fields["oauth_client_id"].help_text += f" Its redirect URI: {redirect_uri()}"
        self.stored_url = self.instance.url if self.instance.pk else ""
        self.credential = self._stored_credential()
        if self.credential is not None:
            self._initial_from_credential(self.credential)
        fields, server = self.fields, self.instance
        if server.pk:
            fields["url"].help_text = (
                f"Stored: {server.origin}/… (the rest is hidden); leave blank to keep it. "
                + fields["url"].help_text
            )
        else:
            fields["url"].required = True
        stored_headers = sorted(server.headers or {})
        if stored_headers:
            fields["headers_text"].help_text = (
                f"Stored: {', '.join(stored_headers)}; leave blank to keep them. "
                + fields["headers_text"].help_text
            )
        if server.secret_token:
            fields["secret_token"].help_text = (
                "A token is stored; leave blank to keep it. " + fields["secret_token"].help_text
            )
        for name in self.nothing_to_remove(server, self.credential):
            del fields[name]

    @staticmethod
    def nothing_to_remove(server, credential):
        """The "Remove the stored …" boxes with nothing stored to remove (all of them for a new
        server, whose `credential` is None): the form leaves them out, and so does the admin's
        layout."""
        stored = {
            "clear_secret_token": bool(server and server.secret_token),
            "clear_headers": bool(server and server.headers),
            "clear_oauth_client_secret": bool(
                credential
                and credential.client_source == ClientSource.PRE_REGISTERED
                and credential.client_secret
            ),
        }
        return {name for name, present in stored.items() if not present}

    def full_clean(self):
        super().full_clean()
        if self.is_bound and self.errors:
            # Typed secrets other than the URL are not shown back: say so beside the field.
            for name in ("secret_token", "headers_text", "oauth_client_secret"):
                if name in self.fields and str(self.data.get(name, "")).strip():
                    field = self[name]  # the bound field copied the help text when created
                    field.help_text = "Not kept after an error: enter it again. " + field.help_text

    def _stored_credential(self):
        if not self.instance.pk:
            return None
        return OAuthCredential.objects.filter(server=self.instance).first()

    def _initial_from_credential(self, credential):
        pre_registered = credential.client_source == ClientSource.PRE_REGISTERED
        self.initial.update(
            oauth_grant=credential.grant,
            oauth_client_id=credential.client_id if pre_registered else "",
            oauth_scope=credential.scope,
            oauth_issuer=credential.expected_issuer,
        )
        if pre_registered and credential.client_secret:
            field = self.fields["oauth_client_secret"]
            field.help_text = (
                "A client secret is stored; leave blank to keep it. " + field.help_text
            )

    def clean_name(self):
        """A name is part of the server's MCP URL, `/mcp/<name>/`: the endpoint's own routes
        (`sse`, `messages`) would shadow it, and a slash would split it."""
        name = self.cleaned_data["name"].strip()
        if name in ("sse", "messages") or "/" in name or not name.isprintable():
            raise ValidationError(
                f"“{name}” can't be a server name: it must be reachable at /mcp/<name>/, so "
                "no “/”, no control characters, and not “sse” or “messages”."
            )
        return name

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

    def clean_oauth_client_id(self):
        value = self.cleaned_data["oauth_client_id"].strip()
        if any(not ch.isprintable() for ch in value):
            raise ValidationError("The client ID can't contain control characters.")
        return value

    def clean_oauth_client_secret(self):
        secret = self.cleaned_data["oauth_client_secret"].strip()
        if any(ord(c) < 32 or ord(c) == 127 for c in secret) or not secret.isascii():
            raise ValidationError("The client secret must be plain ASCII, no control characters.")
        return secret

    def clean_oauth_scope(self):
        scope = " ".join(self.cleaned_data["oauth_scope"].split())
        if scope and not SCOPE.match(scope):
            raise ValidationError("Scopes are words of printable ASCII (no quotes or backslashes).")
        return scope

    def clean_oauth_grant(self):
        return self.cleaned_data["oauth_grant"] or Grant.AUTHORIZATION_CODE

    def clean(self):
        cleaned = super().clean()
        url = cleaned.get("url")
        if url:
            for problem in self._url_problems(url, cleaned):
                self.add_error("url", problem)
        cleaned["auth_kind"] = self._auth_kind()
        headers = cleaned.get("headers_text") or {}
        if "authorization" in {name.lower() for name in headers}:
            if cleaned["auth_kind"] == AuthKind.OAUTH:
                self.add_error("headers_text", "Authorization is set by OAuth; remove it here.")
            elif self._token_after_save():
                self.add_error(
                    "headers_text", "Authorization is set by the secret token; remove one of them."
                )
        if cleaned["auth_kind"] == AuthKind.OAUTH:
            self._clean_oauth(cleaned)
        elif cleaned["auth_kind"] == AuthKind.SECRET_TOKEN and not self._token_after_save():
            self.add_error("secret_token", "Enter the secret token, or choose no authentication.")
        return cleaned

    def _auth_kind(self):
        """The chosen authentication. Typing a token chooses the secret token; a form posted
        without the choice (scripts older than OAuth) keeps OAuth or follows the token."""
        chosen = self.cleaned_data.get("auth_kind")
        if not chosen and self.instance.pk and self.instance.uses_oauth:
            return AuthKind.OAUTH
        if chosen == AuthKind.OAUTH:
            return chosen
        if self.cleaned_data.get("secret_token") or (not chosen and self._token_after_save()):
            return AuthKind.SECRET_TOKEN
        return chosen or AuthKind.NONE

    def _clean_oauth(self, cleaned):
        if cleaned.get("secret_token"):
            self.add_error(
                "secret_token", "An OAuth server gets its token by signing in; remove this one."
            )
        client_id = cleaned.get("oauth_client_id")
        if (cleaned.get("oauth_client_secret") or "") and not client_id:
            self.add_error("oauth_client_secret", "A client secret needs its client ID.")
        if cleaned.get("oauth_grant") == Grant.CLIENT_CREDENTIALS and not (
            client_id and self._client_secret_after_save()
        ):
            self.add_error(
                "oauth_client_id",
                "Client credentials need a client ID and secret registered at the "
                "authorization server.",
            )
        issuer = cleaned.get("oauth_issuer")
        if issuer:
            try:
                netguard.validate_url(issuer, allow_http=cleaned.get("allow_http", False))
            except netguard.UrlRefused as exc:
                self.add_error("oauth_issuer", str(exc))

    def _client_secret_after_save(self):
        data = self.cleaned_data
        if data.get("oauth_client_secret"):
            return True
        stored = self.credential
        same_client = stored is not None and stored.client_id == data.get("oauth_client_id")
        kept = same_client and stored.client_source == ClientSource.PRE_REGISTERED
        return kept and bool(stored.client_secret) and not data.get("clear_oauth_client_secret")

    def _url_problems(self, url, cleaned):
        """Why the URL can't be saved with these options, each naming the option that would
        allow it (all of them at once: a local server often needs both)."""
        problems = []
        try:
            netguard.validate_url(url, allow_http=cleaned.get("allow_http", False))
        except netguard.PlainHttpRefused:
            problems.append(
                "This is a plain http:// URL: the token, headers and tool calls would travel "
                f"unencrypted. To use it anyway, {self.OPTION_HINTS['allow_http']}."
            )
        except netguard.UrlRefused as exc:
            # Keep the reason, not what it quotes: Python's URL parser quotes the port, or the
            # whole netloc with any password in it.
            return [re.sub(r"""(['"]).*\1""", "…", str(exc), flags=re.DOTALL)]
        refusal = netguard.refusal_at_save(
            url,
            allow_private_network=cleaned.get("allow_private_network", False),
            extra_blocked=settings.MCP_EXTRA_BLOCKED_NETWORKS,
            extra_allowed=settings.MCP_EXTRA_ALLOWED_NETWORKS,
        )
        if refusal:
            problems.append(self._address_problem(refusal))
        return problems

    def _address_problem(self, refusal):
        if str(refusal.address) == refusal.host.strip("[]"):
            where = f"{refusal.address} is"
        else:
            where = f"{refusal.host} resolves to {refusal.address},"
        if refusal.blocked_for_every_server:
            return (
                f"{where} {refusal.reason}, which MCP_EXTRA_BLOCKED_NETWORKS blocks for every "
                "server: Toolgate never connects there."
            )
        return (
            f"{where} an address that is not public ({refusal.reason}). If this server runs on "
            f"your own machine or network, {self.OPTION_HINTS['allow_private_network']}."
        )

    def _token_after_save(self):
        if self.cleaned_data.get("clear_secret_token"):
            return bool(self.cleaned_data.get("secret_token"))
        return bool(self.cleaned_data.get("secret_token") or self.instance.secret_token)

    def save(self, commit=True):
        server = super().save(commit=False)
        data = self.cleaned_data
        server.auth_kind = data["auth_kind"]
        if server.auth_kind != AuthKind.SECRET_TOKEN:
            server.secret_token = ""
        elif data.get("secret_token"):
            server.secret_token = data["secret_token"]
        elif data.get("clear_secret_token"):
            server.secret_token = ""
        if data.get("headers_text"):
            server.headers = data["headers_text"]
        elif data.get("clear_headers"):
            server.headers = {}
        if commit:
            server.save()
            self._save_m2m()
        return server

    def _save_m2m(self):
        super()._save_m2m()
        self._save_credential()

    def _save_credential(self):
        """After the server: its OAuth credential follows the chosen authentication."""
        server, data = self.instance, self.cleaned_data
        if not server.uses_oauth:
            OAuthCredential.objects.filter(server=server).delete()  # its tokens go with it
            return
        credential = self.credential or OAuthCredential(server=server)
        before = (credential.grant, credential.client_id, credential.expected_issuer)
        credential.grant, credential.scope = data["oauth_grant"], data["oauth_scope"]
        credential.expected_issuer = data["oauth_issuer"]
        self._apply_client(credential, data)
        credential.save()
        changed = before != (credential.grant, credential.client_id, credential.expected_issuer)
        moved = self.stored_url and self.stored_url != server.url
        if self.credential is not None and credential.access_token and (changed or moved):
            # Its tokens were issued for the old URL or client: never send them elsewhere.
            what = "URL" if moved else "OAuth settings"
            credential.forget_grant(f"its {what} changed.")

    def _apply_client(self, credential, data):
        client_id = data["oauth_client_id"]
        if client_id:
            typed = data["oauth_client_secret"]
            keep = self._client_secret_after_save() and not typed
            credential.client_secret = credential.client_secret if keep else typed
            credential.client_source, credential.client_id = ClientSource.PRE_REGISTERED, client_id
            credential.client_registration = None
        elif credential.client_source == ClientSource.PRE_REGISTERED:
            credential.client_source, credential.client_id, credential.client_secret = "", "", ""

    def _post_clean(self):
        # ModelForm would copy the blank secret_token into the instance before save() decides
        # whether to keep the stored one; put the stored value back first.
        stored_token = self.instance.secret_token
        super()._post_clean()
        self.instance.secret_token = stored_token
