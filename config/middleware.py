"""Security headers on every response, admin included (Django's admin runs no inline script),
and the site's own error pages when DEBUG is on, and Django's middleware that does no I/O run
inline in async requests.

`MiddlewareMixin` makes a middleware async-capable by running each `process_request` and
`process_response` through `sync_to_async`: two hops to the shared thread per middleware per
request (~0.3 ms of CPU each, and a wait for that thread). The Inline ones here only read
settings and the request and set headers, so they run where the request is.
"""

import logging

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.core import signals
from django.middleware.clickjacking import XFrameOptionsMiddleware
from django.middleware.common import CommonMiddleware
from django.middleware.security import SecurityMiddleware
from django.utils.deprecation import MiddlewareMixin

logger = logging.getLogger("django.request")


class _Inline:
    """For a MiddlewareMixin whose methods do no I/O: call them directly when async."""

    async def __acall__(self, request):
        response = None
        if hasattr(self, "process_request"):
            response = self.process_request(request)
        response = response or await self.get_response(request)
        if hasattr(self, "process_response"):
            response = self.process_response(request, response)
        return response


class InlineSecurityMiddleware(_Inline, SecurityMiddleware):
    pass


class InlineCommonMiddleware(_Inline, CommonMiddleware):
    pass


class InlineXFrameOptionsMiddleware(_Inline, XFrameOptionsMiddleware):
    pass


CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "object-src 'none'",
    ]
)
PERMISSIONS_POLICY = "camera=(), microphone=(), geolocation=(), payment=(), usb=()"


class SecurityHeadersMiddleware(_Inline, MiddlewareMixin):
    """Async-capable: a sync-only middleware would make Django run every request, waiting
    agents included, on a thread of its own."""

    def process_response(self, request, response):
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        response.headers.setdefault("Permissions-Policy", PERMISSIONS_POLICY)
        return response


class StyledErrorPagesMiddleware:
    """With DEBUG on (`make run`), Django answers a 404 or an uncaught exception with its
    technical pages: the URL patterns, a traceback, the settings. Those are not what someone
    trying Toolgate should meet, nor what a page opened from another machine should show. This
    gives them the site's own 404 and 500 pages (templates/), and puts the traceback in the
    console log instead. TECHNICAL_ERROR_PAGES=true brings Django's pages back for developing
    Toolgate itself; with DEBUG off Django already uses the site's pages.

    Async-native: a request that needs no page of ours never leaves the event loop for it."""

    sync_capable = async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request):
        if self.is_async:
            return self._acall(request)
        response = self.get_response(request)
        return _page_not_found(request) if _unmatched(request, response) else response

    async def _acall(self, request):
        response = await self.get_response(request)
        if _unmatched(request, response):
            return await sync_to_async(_page_not_found)(request)
        return response

    def process_exception(self, request, exception):
        from django.core.exceptions import PermissionDenied
        from django.http import Http404
        from django.views import defaults

        from config import views

        if not _styled_in_debug():
            return None
        if isinstance(exception, Http404):
            return defaults.page_not_found(request, exception)
        if isinstance(exception, PermissionDenied | _handled_by_django()):
            return None  # Django's own handling (403 page, 400) needs no help
        # What Django's own handling of an uncaught exception does besides its page: the signal
        # (error reporters listen to it) and the django.request log line (ADMINS' mail, console).
        signals.got_request_exception.send(sender=None, request=request)
        logger.error(
            "Internal Server Error: %s", request.path, exc_info=exception,
            extra={"status_code": 500, "request": request},
        )  # fmt: skip
        return views.server_error(request)


def _unmatched(request, response):
    """A path no URL pattern matches never reaches a view (nor process_exception): Django has
    answered with its technical 404 by now. No resolver_match tells it apart."""
    return response.status_code == 404 and request.resolver_match is None and _styled_in_debug()


def _page_not_found(request):
    from django.http import Http404
    from django.views import defaults

    return defaults.page_not_found(request, Http404())


def _styled_in_debug():
    from django.conf import settings

    return settings.DEBUG and not settings.TECHNICAL_ERROR_PAGES


def _handled_by_django():
    from django.core.exceptions import BadRequest, SuspiciousOperation
    from django.http.multipartparser import MultiPartParserError

    return BadRequest | SuspiciousOperation | MultiPartParserError
