"""The predict route's fast path (serving.fastpath) against `recml serve` in a subprocess.

Raw sockets send the bytes: plain predicts (answered by the fast path) one after another,
pipelined and cut in pieces on one connection; everything else is handed to aiohttp,
whose answers (404, 405, 413, 400, 100-continue, chunked bodies, HTTP/1.0...) must come
back as before, on the same connection. The reference for an answer is the same body
answered through aiohttp (a chunked request)."""
# pylint: disable=redefined-outer-name  (pytest fixtures)

import json
import socket
import time

import pytest

from tests.reliability import test_serving_faults as faults

pytestmark = pytest.mark.integration
BODY = json.dumps({"instances": [{"items": [1000, 1007, 1014], "k": 7}]}).encode()


@pytest.fixture(scope="module")
def server(bundles, tmp_path_factory):
  s = faults.CliServer(bundles["sasrec"], str(tmp_path_factory.mktemp("fast") / "serve.log"))
  try:
    s.wait_ready()
    yield s
  finally:
    assert s.stop() == 0, s.read_log()[-3000:]


def post(body: bytes, *headers: str, route: str = "/predict", version: str = "1.1") -> bytes:
  head = [f"POST {route} HTTP/{version}", "Host: x", *headers]
  if not any(h.lower().startswith("transfer-encoding") for h in headers):
    head.append(f"Content-Length: {len(body)}")
  return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def chunked(body: bytes) -> bytes:
  return post(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body), "Transfer-Encoding: chunked")


class Conn:
  """A raw HTTP/1.1 client connection: send bytes, read whole responses."""

  def __init__(self, port: int):
    self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    self.data = b""

  def send(self, data: bytes, pieces: int = 1) -> None:
    step = -(-len(data) // pieces)
    for i in range(0, len(data), step):
      self.sock.sendall(data[i:i + step])
      if pieces > 1:
        time.sleep(0.02)  # each piece its own read on the server

  def response(self) -> tuple[int, dict, bytes]:
    """``(status, headers, body)`` of the next response (interim 100s included)."""
    while b"\r\n\r\n" not in self.data:
      self._more()
    head, self.data = self.data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    n = int(headers.get("Content-Length", 0))
    while len(self.data) < n:
      self._more()
    body, self.data = self.data[:n], self.data[n:]
    return int(lines[0].split()[1]), headers, body

  def closed(self) -> bool:
    try:
      return self.sock.recv(1) == b""
    except OSError:
      return True

  def _more(self) -> None:
    chunk = self.sock.recv(1 << 16)
    assert chunk, f"connection closed; read so far: {self.data[:300]!r}"
    self.data += chunk

  def close(self) -> None:
    self.sock.close()


@pytest.fixture
def conn(server):
  c = Conn(server.port)
  yield c
  c.close()


def reference(server) -> dict:
  c = Conn(server.port)
  try:
    c.send(chunked(BODY))  # chunked: aiohttp's route
    status, headers, body = c.response()
  finally:
    c.close()
  assert status == 200 and "aiohttp" in headers["Server"], (headers, body)
  return json.loads(body)


def test_plain_predicts_keep_alive_pipelined_and_in_pieces(server, conn):
  want = reference(server)
  assert len(want["predictions"][0]["items"]) == 7
  for _ in range(3):  # one after another
    conn.send(post(BODY))
    status, headers, body = conn.response()
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert "Server" not in headers  # answered by the fast path, not aiohttp
    assert json.loads(body) == want
  bodies = [json.dumps({"instances": [{"items": [1000, 1007], "k": k}]}).encode()
            for k in (3, 5, 9)]
  conn.send(b"".join(post(b) for b in bodies))  # pipelined: answered in order
  for k in (3, 5, 9):
    status, _, body = conn.response()
    assert status == 200 and len(json.loads(body)["predictions"][0]["items"]) == k
  conn.send(post(BODY), pieces=7)  # the head and the body cut across reads
  assert json.loads(conn.response()[2]) == want


def test_bad_predict_gets_400_with_the_reason(conn):
  conn.send(post(b'{"instances": [{"items": [1000], "k": 0}]}'))
  status, _, body = conn.response()
  assert status == 400 and "k must be an integer in [1, 20]" in json.loads(body)["error"]
  conn.send(post(BODY))  # the connection goes on
  assert conn.response()[0] == 200


@pytest.mark.parametrize("request_bytes, want", [
    (b"GET /predict HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (post(BODY, route="/nope"), 404),
    (post(BODY, route="/predict?trace=1"), 200),
    (post(BODY, "Content-Encoding: identity"), 200),
    (post(BODY, "Content-Length: 5"), 400),                  # two lengths
    (post(b" " * (faults.MAX_BODY + 1)), 413),
    (chunked(BODY), 200),
    (chunked(b" " * (faults.MAX_BODY + 1)), 413),
    (post(BODY, "X-Folded: a\r\n b"), 400),                   # obsolete line folding
    (b"POST /predict HTTP/1.1\nHost: x\nContent-Length: 2\n\n{}", 400),  # bare line feeds
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n", 400),
])
def test_other_requests_get_aiohttps_answers(conn, request_bytes, want):
  conn.send(request_bytes)
  status, _, body = conn.response()
  assert status == want, body[:300]


def test_handed_over_connections_keep_serving(server, conn):
  want = reference(server)
  conn.send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # aiohttp takes the connection
  status, _, body = conn.response()
  assert status == 200 and json.loads(body)["status"] == "ready"
  conn.send(post(BODY) + post(BODY))  # later plain predicts: aiohttp answers them
  assert [json.loads(conn.response()[2]) for _ in range(2)] == [want, want]


def test_expect_continue_and_connection_close(server, conn):
  want = reference(server)
  conn.send(b"POST /predict HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(BODY))
  assert conn.response()[0] == 100  # curl waits for this before a large body
  conn.send(BODY)
  status, _, body = conn.response()
  assert status == 200 and json.loads(body) == want
  conn.send(post(BODY, "Connection: close"))
  status, _, body = conn.response()
  assert status == 200 and json.loads(body) == want
  assert conn.closed()


def test_http10_is_answered_and_closed(server, conn):
  conn.send(post(BODY, version="1.0"))
  status, _, body = conn.response()
  assert status == 200 and json.loads(body) == reference(server)
  assert conn.closed()
