"""The HTTP/1.1 protocol of the HTTP process on httptools: uvicorn's, with h11's bound on
a request's head.

h11 refuses a request whose request line and headers pass `h11_max_incomplete_event_size`
bytes without ending; uvicorn's httptools protocol keeps every header line a client sends
until the head ends, so one client sending header after header grows the HTTP process
without end (and the HTTP process dying stops the job). Here the bytes received while a
head is incomplete are counted (from the end of the last request, so a pipelined head is
counted from its next read on) and past the bound the client gets a 431 and the
connection is closed, as h11 answers with its 400.

Imported only where httptools is (uvicorn's protocol imports it).
"""

from __future__ import annotations

import h11
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class BoundedHeadHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol; a head longer than the config's h11 bound is a 431."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        bound = self.config.h11_max_incomplete_event_size
        self.head_bound = bound if bound is not None else h11.DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
        self._in_head = True  # waiting for (or reading) a request line and headers
        self._head_bytes = 0

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        over = self._in_head and self._head_bytes > self.head_bound
        if over and not self.transport.is_closing():  # (closed: refused by the parser)
            self._refuse_head()

    def on_headers_complete(self) -> None:
        self._in_head, self._head_bytes = False, 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_bytes = True, 0

    def _refuse_head(self) -> None:
        message = f"the request line and headers exceed {self.head_bound} bytes".encode()
        self.logger.warning("Request head over %d bytes refused.", self.head_bound)
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(message), message)
        )
        self.transport.close()
