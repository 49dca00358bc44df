"""The MovieLens downloader against a local HTTP server (never the internet)."""

import dataclasses
import hashlib
import http.server
import io
import os
import threading
import zipfile

import pytest

from pipelines import data


def make_zip() -> bytes:
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as z:
    z.writestr("ml-1m/ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n")
    z.writestr("ml-1m/README", "tiny\n")
  return buf.getvalue()


@pytest.fixture(name="server")
def fixture_server():
  payload = make_zip()
  hits = []

  class Handler(http.server.BaseHTTPRequestHandler):

    def do_GET(self):  # pylint: disable=invalid-name
      hits.append(self.path)
      if self.path != "/ml-1m.zip":
        self.send_error(404)
        return
      self.send_response(200)
      self.send_header("Content-Length", str(len(payload)))
      self.end_headers()
      self.wfile.write(payload)

    def log_message(self, *args):
      pass

  httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{httpd.server_port}", payload, hits
  httpd.shutdown()
  httpd.server_close()


def test_published_checksum_is_the_grouplens_md5():
  assert data.MOVIELENS_1M.md5 == "c4d9eecfca2ab87c1945afe126590906"
  assert data.MOVIELENS_1M.url == "https://files.grouplens.org/datasets/movielens/ml-1m.zip"


def test_download_verifies_and_caches(tmp_path, server):
  base, payload, hits = server
  spec = dataclasses.replace(data.MOVIELENS_1M, md5=hashlib.md5(payload).hexdigest())
  path = data.fetch(spec, cache=str(tmp_path), url=f"{base}/ml-1m.zip")
  assert path == str(tmp_path / "ml-1m")
  assert open(os.path.join(path, "ratings.dat")).read().startswith("1::1193")
  assert data.fetch(spec, cache=str(tmp_path), url=f"{base}/ml-1m.zip") == path
  assert hits == ["/ml-1m.zip"]  # the second call used the cache
  assert not [f for f in os.listdir(tmp_path) if f.endswith(".zip")]


def test_checksum_mismatch_is_refused(tmp_path, server):
  base, _, _ = server
  spec = dataclasses.replace(data.MOVIELENS_1M, md5="0" * 32)
  with pytest.raises(data.ChecksumMismatch, match="does not match"):
    data.fetch(spec, cache=str(tmp_path), url=f"{base}/ml-1m.zip")
  assert not os.path.exists(tmp_path / "ml-1m")
  assert not [f for f in os.listdir(tmp_path) if f.endswith(".zip")]


def test_offline_error_says_to_pass_data(tmp_path, server):
  base, _, _ = server
  with pytest.raises(data.DataUnavailable, match="--data"):
    data.fetch(data.MOVIELENS_1M, cache=str(tmp_path), url=f"{base}/missing.zip")
  with pytest.raises(data.DataUnavailable, match="--data"):
    data.fetch(data.MOVIELENS_1M, cache=str(tmp_path), url="http://127.0.0.1:9/ml-1m.zip",
               timeout=2)


def test_resolve_data(tmp_path):
  assert data.resolve_data("gs://bucket/x") == "gs://bucket/x"
  assert data.resolve_data(str(tmp_path)) == str(tmp_path)
  with pytest.raises(data.DataUnavailable, match="no such"):
    data.resolve_data(str(tmp_path / "missing"))
  with pytest.raises(data.DataUnavailable, match="--data"):
    data.resolve_data("")


def test_cache_dir_follows_the_user_cache(monkeypatch, tmp_path):
  monkeypatch.delenv("RECML_CACHE", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert data.cache_dir() == str(tmp_path / "recml")
  monkeypatch.setenv("RECML_CACHE", "/x/y")
  assert data.cache_dir() == "/x/y"
