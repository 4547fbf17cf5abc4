"""The operators' notes' three agent-registration requests, byte for byte.

Source: the notes' section "Registering an Agent" (curl, HTTP/RAW, Go client).

* ``CURL``: what curl 7.88.1 really sends for the notes' command: ONE Content-Type
  header (urlencoded, yet with curl's own boundary) and ``Content-Disposition:
  attachment``.
* ``RAW_HTTP``: the notes' raw block with CRLF line ends plus a Content-Length; the
  body ends with a CRLF after the closing delimiter (the block's last line).
  ``RAW_HTTP_NO_FINAL_CRLF`` is the same without that final CRLF.
* ``GO_CLIENT``: what Go's net/http sends: two Content-Type headers (multipart, then
  urlencoded), headers in Go's wire order, body without a trailing CRLF.

Each is a ``NotesRequest`` with ``content_types`` (the Content-Type header values,
in wire order), ``body`` (for name ``agent2``) and ``template`` (the full request
with the ``HOST_PLACEHOLDER``); ``build(name, host_port)`` gives the full request
for any agent name and ``host:port``, with Content-Length kept correct.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "HOST_PLACEHOLDER", "NOTES_NAME", "WEBKIT_BOUNDARY", "CURL_BOUNDARY",
    "NotesRequest", "CURL", "RAW_HTTP", "RAW_HTTP_NO_FINAL_CRLF", "GO_CLIENT",
    "ALL", "CURL_REQUEST", "RAW_HTTP_REQUEST", "RAW_HTTP_REQUEST_NO_FINAL_CRLF",
    "GO_CLIENT_REQUEST", "split",
]

HOST_PLACEHOLDER = b"{HOST_PORT}"
NOTES_NAME = "agent2"
WEBKIT_BOUNDARY = b"----WebKitFormBoundary7MA4YWxkTrZu0gW"
CURL_BOUNDARY = b"------------------------b9023d6ba4b27ab4"


def _curl_body(name: bytes) -> bytes:
    return (b"--" + CURL_BOUNDARY + b"\r\n"
            b'Content-Disposition: attachment; name="name"\r\n\r\n'
            + name + b"\r\n--" + CURL_BOUNDARY + b"--\r\n")


def _webkit_body(name: bytes, final_crlf: bool) -> bytes:
    return (b"--" + WEBKIT_BOUNDARY + b"\r\n"
            b'Content-Disposition: form-data; name="name"\r\n\r\n'
            + name + b"\r\n--" + WEBKIT_BOUNDARY + b"--" + (b"\r\n" if final_crlf else b""))


@dataclass(frozen=True)
class NotesRequest:
    label: str
    head: bytes  # request line + headers, with b"{HOST_PORT}" and b"{CONTENT_LENGTH}"
    content_types: tuple[bytes, ...]
    final_crlf: bool
    curl: bool = False

    def body_for(self, name: str = NOTES_NAME) -> bytes:
        raw = name.encode("utf-8")
        return _curl_body(raw) if self.curl else _webkit_body(raw, self.final_crlf)

    @property
    def body(self) -> bytes:
        return self.body_for(NOTES_NAME)

    @property
    def template(self) -> bytes:
        """The full request for ``agent2`` with the Host placeholder left in."""
        return self.head.replace(b"{CONTENT_LENGTH}", str(len(self.body)).encode()) + self.body

    def build(self, name: str = NOTES_NAME, host_port: str = "localhost:4000") -> bytes:
        body = self.body_for(name)
        return (self.head.replace(HOST_PLACEHOLDER, host_port.encode("ascii"))
                .replace(b"{CONTENT_LENGTH}", str(len(body)).encode()) + body)


CURL = NotesRequest(
    label="curl",
    head=(b"POST /api/v1/agents HTTP/1.1\r\n"
          b"Host: {HOST_PORT}\r\n"
          b"User-Agent: curl/7.88.1\r\n"
          b"Accept: */*\r\n"
          b"Authorization: Bearer EASY\r\n"
          b"Cache-Control: no-cache\r\n"
          b"Postman-Token: 4ba0a028-5b71-f875-718b-63d71eb866ae\r\n"
          b"Content-Length: {CONTENT_LENGTH}\r\n"
          b"Content-Type: application/x-www-form-urlencoded; boundary=" + CURL_BOUNDARY + b"\r\n"
          b"\r\n"),
    content_types=(b"application/x-www-form-urlencoded; boundary=" + CURL_BOUNDARY,),
    final_crlf=True,
    curl=True,
)

_RAW_HEAD = (b"POST /api/v1/agents HTTP/1.1\r\n"
             b"Host: {HOST_PORT}\r\n"
             b"Content-Type: multipart/form-data; boundary=" + WEBKIT_BOUNDARY + b"\r\n"
             b"Authorization: Bearer EASY\r\n"
             b"Cache-Control: no-cache\r\n"
             b"Postman-Token: aa131313-1086-75a1-7749-958479bd554f\r\n"
             b"Content-Length: {CONTENT_LENGTH}\r\n"
             b"\r\n")

RAW_HTTP = NotesRequest(
    label="raw-http",
    head=_RAW_HEAD,
    content_types=(b"multipart/form-data; boundary=" + WEBKIT_BOUNDARY,),
    final_crlf=True,
)

RAW_HTTP_NO_FINAL_CRLF = NotesRequest(
    label="raw-http-no-final-crlf",
    head=_RAW_HEAD,
    content_types=RAW_HTTP.content_types,
    final_crlf=False,
)

GO_CLIENT = NotesRequest(
    label="go-client",
    head=(b"POST /api/v1/agents HTTP/1.1\r\n"
          b"Host: {HOST_PORT}\r\n"
          b"User-Agent: Go-http-client/1.1\r\n"
          b"Content-Length: {CONTENT_LENGTH}\r\n"
          b"Authorization: Bearer EASY\r\n"
          b"Cache-Control: no-cache\r\n"
          b"Content-Type: multipart/form-data; boundary=" + WEBKIT_BOUNDARY + b"\r\n"
          b"Content-Type: application/x-www-form-urlencoded\r\n"
          b"Postman-Token: a32f687c-5915-44f4-8bc6-82e915ae0cad\r\n"
          b"Accept-Encoding: gzip\r\n"
          b"\r\n"),
    content_types=(b"multipart/form-data; boundary=" + WEBKIT_BOUNDARY,
                   b"application/x-www-form-urlencoded"),
    final_crlf=False,
)

ALL = (CURL, RAW_HTTP, RAW_HTTP_NO_FINAL_CRLF, GO_CLIENT)

# The full requests as byte-string constants (name agent2, Host placeholder left in).
CURL_REQUEST = CURL.template
RAW_HTTP_REQUEST = RAW_HTTP.template
RAW_HTTP_REQUEST_NO_FINAL_CRLF = RAW_HTTP_NO_FINAL_CRLF.template
GO_CLIENT_REQUEST = GO_CLIENT.template


def split(raw: bytes) -> tuple[list[bytes], bytes]:
    """Split a full raw request into its Content-Type header values (wire order) and body."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, "no end of headers"
    content_types = []
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-type":
            content_types.append(value.strip())
    return content_types, body


# The operators' notes, "Creating a task", JSON BODY -- verbatim.
NOTES_TASK: dict = {
    "name": "example-task-1",
    "metrics": {"/example-task/*": 0},
    "config": {"/example-task": {"param1": "value1", "param2": "value2"}},
    "interval": 300,
    "route": {"type": "any"},
    "enabled": True,
}
