"""The predict route's fast path: a lean HTTP/1.1 reader and writer in front of aiohttp.

aiohttp's request and response objects and its handler task cost about 45 µs of CPU
per request on this project's 2-core machine, a third of what an HTTP worker spends on
a predict. :class:`FastPath` reads a connection's requests itself and answers the plain
case at once: ``POST <predict route> HTTP/1.1`` with a ``Content-Length`` within the
body limit, and no ``Transfer-Encoding``, ``Content-Encoding``, ``Expect``,
``Connection`` or ``Upgrade`` header. Anything else (the other routes, HTTP/1.0, chunked
or compressed bodies, ``Expect: 100-continue``, a body over the limit, a malformed
request) hands the connection, with the bytes read so far, to aiohttp's own protocol,
which serves it from then on: every case but the plain one gets aiohttp's answers (404,
405, 400, 413...). Both paths answer a predict body with the same function
(:func:`serving.server.make_app`'s ``answer_predict``).

Requests on a connection are answered in order, one at a time (pipelined ones wait in
the buffer). :class:`FastSite` is the aiohttp site that serves a listening socket so;
on stop, it lets the requests in flight finish (up to ``shutdown_timeout``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Awaitable, Callable

log = logging.getLogger("recml.serve")

MAX_HEAD = 8190        # bytes of request line and headers (aiohttp's line limit)
HANDOFF_HEADERS = frozenset((b"transfer-encoding", b"content-encoding", b"expect",
                             b"connection", b"upgrade"))
REASONS = {200: b"OK", 400: b"Bad Request", 413: b"Payload Too Large",
           500: b"Internal Server Error", 503: b"Service Unavailable"}

# body -> (status, JSON body, Retry-After seconds or None)
Answer = Callable[[bytes], Awaitable[tuple[int, bytes, "int | None"]]]


def listening_socket(host: str, port: int, reuse_port: bool = False,
                     listen: bool = True) -> socket.socket:
  """A TCP socket bound to ``host:port``; ``reuse_port``: with ``SO_REUSEPORT`` (HTTP
  workers sharing the port; the kernel spreads new connections over them);
  ``listen=False``: bound only (holds the port, receives no connections)."""
  family, kind, proto, _, address = socket.getaddrinfo(
      host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
  sock = socket.socket(family, kind, proto)
  try:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
      sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    if listen:
      sock.listen(1024)
      sock.setblocking(False)
  except BaseException:
    sock.close()
    raise
  return sock


def _plain(head: bytes, route: bytes, max_body: int) -> int | None:
  """The body length of a plain predict request's head, else None (aiohttp's case)."""
  lines = head.split(b"\r\n")
  if lines[0] != b"POST " + route + b" HTTP/1.1":
    return None
  length = None
  for line in lines[1:]:
    name, colon, value = line.partition(b":")
    if not colon or not name or name[-1:].isspace() or line[:1].isspace():
      return None  # malformed, or a folded line: aiohttp says what is wrong
    name = name.lower()
    if name == b"content-length":
      value = value.strip()
      if length is not None or not value.isdigit():
        return None
      length = int(value)
    elif name in HANDOFF_HEADERS:
      return None
  return length if length is not None and length <= max_body else None


class FastPath(asyncio.Protocol):
  """One connection: plain predicts answered here, the rest handed to aiohttp."""

  def __init__(self, site: FastSite):
    self.site = site
    self.transport: asyncio.Transport | None = None
    self.busy = False      # a request is being answered
    self.closing = False   # close after the answer in flight (shutdown)
    self.paused = False    # reading paused: pipelined requests fill the buffer
    self._buffer = bytearray()

  def connection_made(self, transport) -> None:
    self.transport = transport
    self.site.connections.add(self)

  def connection_lost(self, exc) -> None:
    del exc
    self.transport = None
    self.site.connections.discard(self)

  def data_received(self, data: bytes) -> None:
    self._buffer += data
    if not self.busy:
      self._next()
    elif len(self._buffer) > self.site.max_body + MAX_HEAD and not self.paused:
      self.paused = True  # pipelined requests beyond one largest body wait in the socket
      self.transport.pause_reading()

  def _next(self) -> None:
    buf = self._buffer
    end = buf.find(b"\r\n\r\n")
    if end < 0:
      if len(buf) > MAX_HEAD or b"\n\n" in buf:
        self._handoff()  # too long, or bare line feeds: aiohttp's answer
      return
    length = _plain(bytes(buf[:end]), self.site.route, self.site.max_body)
    if length is None:
      self._handoff()
      return
    start = end + 4
    if len(buf) < start + length:
      return  # the rest of the body is on its way
    body = bytes(buf[start:start + length])
    del buf[:start + length]
    self.busy = True
    asyncio.get_running_loop().create_task(self._answer(body))

  async def _answer(self, body: bytes) -> None:
    try:
      status, payload, retry_after = await self.site.answer(body)
    except Exception as e:  # pylint: disable=broad-except
      log.exception("predict failed")
      status, payload, retry_after = 500, (b'{"error": "internal error: %s"}' %
                                           type(e).__name__.encode()), None
    transport = self.transport
    if transport is None:  # the client went away
      return
    head = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % (
        status, REASONS.get(status, b"Error"), len(payload))
    if retry_after is not None:
      head += b"Retry-After: %d\r\n" % retry_after
    transport.write(head + b"\r\n" + payload)
    self.busy = False
    if self.closing:
      transport.close()
      return
    if self.paused:
      self.paused = False
      transport.resume_reading()
    if self._buffer:
      self._next()

  def _handoff(self) -> None:
    """aiohttp's protocol takes the connection, with what was read of it."""
    handler = self.site.runner.server()
    transport, data = self.transport, bytes(self._buffer)
    self._buffer.clear()
    self.site.connections.discard(self)
    self.transport = None
    transport.set_protocol(handler)
    handler.connection_made(transport)
    if data:
      handler.data_received(data)


class FastSite:
  """An aiohttp site (``runner`` :class:`aiohttp.web.AppRunner`, set up) on a
  listening socket, with :class:`FastPath` in front of aiohttp's protocol.

  ``answer``: the predict route's answer to a body; ``route``: its path.
  """

  def __init__(self, runner, sock: socket.socket, answer: Answer, route: str, max_body: int,
               shutdown_timeout: float = 5.0):
    self.runner, self.sock, self.answer = runner, sock, answer
    self.route, self.max_body = route.encode(), max_body
    self.shutdown_timeout = shutdown_timeout
    self.connections: set[FastPath] = set()
    self._server: asyncio.AbstractServer | None = None

  @property
  def name(self) -> str:
    host, port = self.sock.getsockname()[:2]
    return f"http://{host}:{port}"

  async def start(self) -> None:
    self.runner._reg_site(self)  # pylint: disable=protected-access  (runner.cleanup stops us)
    self._server = await asyncio.get_running_loop().create_server(
        lambda: FastPath(self), sock=self.sock)

  async def stop(self) -> None:
    """Stops accepting; lets the answers in flight go out, then closes the connections."""
    self.runner._unreg_site(self)  # pylint: disable=protected-access
    if self._server is not None:
      self._server.close()
    for conn in list(self.connections):
      conn.closing = True
      if not conn.busy and conn.transport is not None:
        conn.transport.close()
    deadline = asyncio.get_running_loop().time() + self.shutdown_timeout
    while any(c.busy for c in self.connections):
      if asyncio.get_running_loop().time() > deadline:
        break
      await asyncio.sleep(0.05)
    for conn in list(self.connections):
      if conn.transport is not None:
        conn.transport.close()
