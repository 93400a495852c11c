"""Site-wide error pages: in the site's layout, saying what happened and what to do.

Django's own 403 and 404 views render `templates/403.html` and `404.html` with the request, so
only the 500 page and the CSRF failure page need a view here. Agents under /api/ get JSON, as
from every other API error.
"""

import logging

from django.http import HttpResponseServerError, JsonResponse
from django.shortcuts import render
from django.template import loader
from django.views.decorators.csrf import requires_csrf_token

logger = logging.getLogger(__name__)


def _for_agent(request):
    return request.path.startswith("/api/")


@requires_csrf_token
def server_error(request):
    if _for_agent(request):
        return JsonResponse(
            {"error": {"code": "internal", "message": "Internal error; see the server log."}},
            status=500,
        )
    try:  # with the request, for the header (who is logged in, the log-out button)
        return render(request, "500.html", status=500)
    except Exception:
        # Whatever broke the page may break this too (the database, the session): fall back to
        # the page without anything the request would have to look up.
        logger.exception("The 500 page could not be rendered with the request")
        return _plain_500()


def _plain_500():
    return HttpResponseServerError(loader.get_template("500.html").render())


@requires_csrf_token
def csrf_failure(request, reason=""):
    """Rendered with the request, so the page carries a fresh CSRF token: its log-out button
    and the retried form work."""
    return render(request, "403_csrf.html", {"reason": reason}, status=403)
