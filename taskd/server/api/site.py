"""The HTTP site: request bodies bounded, and parsed only by the API.

twisted.web would otherwise parse form bodies itself by the *first* Content-Type header
and answer a malformed multipart body with a bare 400 before any handler runs, which is
exactly wrong for the notes' requests (see bodies.py). A body over `max-body-size` is
not kept in memory: its bytes are discarded as they arrive and the API answers 413.
"""
from __future__ import annotations

from twisted.logger import Logger, LogLevel
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from taskd.logsetup import level_enabled
from taskd.server.api.envelope import error

ACCESS_NAMESPACE = "taskd.server.access"
access_log = Logger(namespace=ACCESS_NAMESPACE)


class TaskdRequest(Request):
    body_too_large = False

    def _limit(self) -> int:
        return getattr(self.channel.site, "max_body_size", 1 << 20)

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._limit():
            self.body_too_large = True
            length = 0  # never spool a body we will refuse
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        if self.content.tell() + len(data) > self._limit():
            self.body_too_large = True
            self.content.seek(0)
            self.content.truncate()
            return
        super().handleContentChunk(data)


class TaskdSite(Site):
    requestFactory = TaskdRequest

    def log(self, request: Request) -> None:
        """One access line per request (method, URI, status, size, client; never
        headers), at debug: at a few thousand requests/s, twisted.web's combined-format
        line through the legacy log at info took a tenth of the reactor's time
        (bench/analysis.md, API GET); not even built when debug is off."""
        if not level_enabled(ACCESS_NAMESPACE, LogLevel.debug):
            return
        access_log.debug(
            "{method} {uri} {code} {length} {ip}",
            method=request.method.decode("ascii", "replace"),
            uri=request.uri.decode("utf-8", "replace"),
            code=request.code,
            length=request.sentLength,
            ip=getattr(request.getClientAddress(), "host", "-"),
        )

    def __init__(self, resource: IResource, *, max_body_size: int, **kwargs) -> None:
        super().__init__(resource, parsePOSTFormSubmission=False, **kwargs)
        self.max_body_size = max_body_size
        self.noisy = False

    def getResourceFor(self, request: Request) -> IResource:
        resource = super().getResourceFor(request)
        try:  # Klein would answer these with a bare text/plain 400, outside the envelope
            b"/".join(request.prepath + request.postpath).decode("utf-8")
            request.getRequestHostname().decode("utf-8")
        except UnicodeDecodeError:
            return _NonUtf8Url()
        return resource


class _NonUtf8Url(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return error(request, 400, "the URL path or Host is not valid UTF-8 (after %-decoding)")
