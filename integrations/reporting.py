"""Error reports (the debug page, mails to ADMINS) without Toolgate's secrets.

Django's own `SafeExceptionReporterFilter` already hides settings and `request.META` entries
whose name contains API, AUTH, TOKEN, KEY, SECRET, PASS or SIGNATURE (so SECRET_KEY,
FIELD_ENCRYPTION_KEYS, DATABASES' PASSWORD and HTTP_AUTHORIZATION), and, with DEBUG off, the
POST parameters and local variables a view names with `sensitive_post_parameters` and
`sensitive_variables`. This filter also hides:

- names containing URL or HEADER: CELERY_BROKER_URL, DATABASE_URL & co. where a WSGI server
  copies the environment into `request.META` (such URLs may carry passwords; a server URL may
  carry a key), and a server's headers;
- the POST parameters that carry MCP server secrets or passwords, on every view, decorated or
  not (`sensitive_post_parameters` on the server admin stays as the view's own statement);
- traceback variables with such a name (`url`, `token`, `headers`…), keys with such a name in
  dict variables (a form's `cleaned_data`), and any variable whose value contains a secret
  posted with the request (the parsed parts of a posted URL, say);
- all of the above with DEBUG on as well: a development machine holds real tokens too.
"""

import re
from urllib.parse import urlsplit

from django.views import debug

SENSITIVE_POST_PARAMETERS = {
    "url", "secret_token", "headers_text", "oauth_client_secret", "password", "token"
}  # fmt: skip


class SafeExceptionReporterFilter(debug.SafeExceptionReporterFilter):
    hidden_settings = re.compile(
        "API|AUTH|TOKEN|KEY|SECRET|PASS|SIGNATURE|HTTP_COOKIE|URL|HEADER", flags=re.IGNORECASE
    )

    def is_active(self, request):
        return True

    def get_post_parameters(self, request):
        return self._cleanse_post(super().get_post_parameters(request))

    def get_cleansed_multivaluedict(self, request, multivaluedict):
        # request.POST (or a copy of it) held by a local variable of a traceback frame
        return self._cleanse_post(super().get_cleansed_multivaluedict(request, multivaluedict))

    def get_traceback_frame_variables(self, request, tb_frame):
        posted = self._posted_secrets(request)
        cleansed = []
        for name, value in super().get_traceback_frame_variables(request, tb_frame):
            value = self.cleanse_setting(name, value)
            if posted and any(secret in _repr(value) for secret in posted):
                value = self.cleansed_substitute
            cleansed.append((name, value))
        return cleansed

    def _sensitive_post_names(self, params):
        return [
            name
            for name in params
            if name in SENSITIVE_POST_PARAMETERS or self.hidden_settings.search(name)
        ]

    def _cleanse_post(self, params):
        names = self._sensitive_post_names(params)
        if names:
            params = params.copy()
            for name in names:
                params[name] = self.cleansed_substitute
        return params

    def _posted_secrets(self, request):
        """The secret values this request carried, and the parts code would parse them into."""
        post = getattr(request, "POST", None) or {}
        values = [v for name in self._sensitive_post_names(post) for v in post.getlist(name)]
        values.append(getattr(request, "META", {}).get("HTTP_AUTHORIZATION", "").split(" ")[-1])
        secrets = set()
        for value in values:
            secrets.add(value)
            secrets.update(line.partition(":")[2].strip() for line in value.splitlines())
            if "://" in value:
                parts = urlsplit(value)
                secrets.update([parts.path, parts.query, parts.netloc.rpartition("@")[0]])
        return {secret for secret in secrets if len(secret) >= 6}


def _repr(value):
    try:
        return repr(value)
    except Exception:
        return ""
