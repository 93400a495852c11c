"""Pages the outside world reaches for OAuth: Toolgate's redirect URI (where an authorization
server sends the browser back) and its Client ID Metadata Document."""

from django.contrib import messages
from django.http import JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.cache import cache_control, never_cache
from django.views.decorators.http import require_GET

from integrations import oauth
from integrations.oauth import OAuthAuthorization

UNKNOWN = (
    "This sign-in link is unknown, was already used, or has expired; nothing was changed. "
    "Start again with Connect on the server's page."
)
ELSEWHERE = (
    "This sign-in was started in another browser session (or at another address than "
    "Toolgate's SITE_URL); nothing was changed. Start it again from this browser."
)


@require_GET
@never_cache
def oauth_callback(request):
    """The authorization server's answer. Its `state` must be a pending sign-in's, used once,
    from the session that started it (or for the waiting `authorize` command)."""
    authorization = OAuthAuthorization.pending(request.GET.get("state"))
    if authorization is None:
        return _result(request, "Sign-in failed", UNKNOWN, status=400)
    if not authorization.belongs_to(request):
        return _result(request, "Sign-in failed", ELSEWHERE, status=403)
    if not authorization.claim():
        return _result(request, "Sign-in failed", UNKNOWN, status=400)
    connected = authorization.complete(request.GET)
    server = authorization.credential.server
    if authorization.for_command:
        if connected:
            message = f"{server.name} is connected; the command has finished. Close this tab."
            return _result(request, "Connected", message)
        return _result(request, "Sign-in failed", authorization.error, status=400)
    if connected:
        messages.success(request, f"Connected {server.name}. Its tools are being synced.")
    else:
        messages.error(request, f"{server.name} was not connected: {authorization.error}")
    return redirect(reverse("admin:integrations_mcpserver_change", args=[server.pk]))


def _result(request, title, message, status=200):
    context = {"title": title, "message": message}
    return render(request, "integrations/oauth_result.html", context, status=status)


@require_GET
@cache_control(public=True, max_age=300)
def client_metadata(request):
    """Toolgate's Client ID Metadata Document: authorization servers that support them fetch
    this URL (Toolgate's client ID) to learn its name and redirect URI."""
    return JsonResponse(oauth.client_metadata_document())
