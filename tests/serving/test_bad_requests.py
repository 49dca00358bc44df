"""Malformed requests get a 400 that says what is wrong; random JSON gets only 200 or 400."""

import json
import random

import pytest

from tests.serving.conftest import request

pytestmark = pytest.mark.integration
OK = {"items": [1000, 1007]}


MALFORMED = [  # (body, what its 400 says)
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
    (b'{"instances": [{"items": [NaN]}]}', "NaN"),
    (b"[" * 100_000, "not valid JSON"),
    (b"[]", "JSON object"),
    ({"instance": [OK]}, "unknown top-level field"),
    ({"instances": OK}, "list of objects"),
    ({"instances": []}, "empty"),
    ({"instances": [OK] * 65}, "too many instances"),
    ({"instances": ["1000"]}, "must be an object"),
    ({"instances": [{"item": [1]}]}, "unknown field"),
    ({"instances": [{"items": "1000"}]}, "items must be a list"),
    ({"instances": [{"items": []}]}, "items is empty"),
    ({"instances": [{"items": [1000] * 13}]}, "at most 12"),
    ({"instances": [{"items": [1.5]}]}, "string or an integer"),
    ({"instances": [{"items": [True]}]}, "string or an integer"),
    ({"instances": [{"items": [None]}]}, "string or an integer"),
    ({"instances": [{"items": [[1000]]}]}, "string or an integer"),
    ({"instances": [{"items": ["x" * 300]}]}, "longer than"),
    ({"instances": [{**OK, "k": 0}]}, "k must be an integer in [1, 20]"),
    ({"instances": [{**OK, "k": 21}]}, "k must be an integer in [1, 20]"),
    ({"instances": [{**OK, "k": "10"}]}, "k must be an integer"),
    ({"instances": [{**OK, "k": 10.0}]}, "k must be an integer"),
    ({"instances": [{**OK, "k": True}]}, "k must be an integer"),
    ({"instances": [OK], "parameters": {"k": -1}}, "parameters.k"),
    ({"instances": [OK], "parameters": {"top": 3}}, "unknown parameter"),
    ({"instances": [OK], "parameters": []}, "parameters"),
    ({"instances": [{**OK, "exclude_history": "yes"}]}, "exclude_history must be true or false"),
    ({"instances": [{**OK, "timestamps": [1]}]}, "timestamps must be a list of 2"),
    ({"instances": [{**OK, "timestamps": [1, "2"]}]}, "timestamps[1]"),
    ({"instances": [{**OK, "timestamps": [1, 2**63]}]}, "unix time"),
    ({"instances": [{**OK, "timestamps": [-1, 2]}]}, "unix time"),
    ({"instances": [{**OK, "query_timestamp": 1.5}]}, "query_timestamp"),
]


@pytest.mark.parametrize("body, message", MALFORMED)
def test_malformed_request_is_a_400_with_the_reason(servers, body, message):
  status, answer = servers["sasrec"].post(body)
  assert status == 400, answer
  assert message in answer["error"], answer["error"]


def test_payload_too_large(servers):
  big = json.dumps({"instances": [{"items": ["x" * 200] * 12}] * 64}).encode() + b" " * (1 << 20)
  status, answer = servers["sasrec"].post(big)
  assert status == 413 and "payload too large" in answer["error"]


def test_server_still_answers_after_bad_requests(servers):
  status, answer = servers["sasrec"].post({"instances": [OK]})
  assert status == 200 and len(answer["predictions"][0]["items"]) == 10


def _random_json(rng: random.Random, depth: int = 0):
  kind = rng.randrange(9 if depth < 4 else 6)
  if kind == 0:
    return None
  if kind == 1:
    return rng.choice([True, False])
  if kind == 2:
    return rng.choice([0, 1, -1, 10, 20, 21, 2**31, 2**63, 1000, 1007, -2**40])
  if kind == 3:
    return rng.choice([0.0, 1.5, -3.25, 1e300])
  if kind == 4:
    return rng.choice(["", "1000", "items", "k", "x" * 300, "\u00e9\u4e2d", "<pad>", "<oov>"])
  if kind == 5:
    return rng.choice([[1000, 1007], ["1000"], [], [1000] * 13])
  if kind == 6:
    return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
  keys = ["instances", "parameters", "items", "k", "exclude_history", "timestamps",
          "query_timestamp", "other"]
  return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def _mutate(rng: random.Random) -> object:
  inst = {"items": [1000, 1007, 1014]}
  for key in rng.sample(["k", "exclude_history", "timestamps", "query_timestamp", "items"],
                        rng.randrange(3)):
    inst[key] = _random_json(rng, 2)
  return {"instances": [inst] * rng.randrange(0, 3)}


def test_fuzz_random_json_gets_200_or_400(servers):
  rng = random.Random(1234)
  seen = set()
  for i in range(400):
    body = _random_json(rng) if i % 2 else _mutate(rng)
    raw = json.dumps(body).encode()
    if i % 17 == 0:
      raw = raw[:rng.randrange(len(raw) + 1)]  # truncated
    status, answer = servers["hstu" if i % 3 else "sasrec"].post(raw)
    assert status in (200, 400), (raw[:200], status, answer)
    if status == 400:
      assert answer["error"]
    seen.add(status)
  assert seen == {200, 400}


def test_a_dead_device_process_is_reported_not_hung(bundles, start_server):
  """If the model's process dies, requests get a 503 saying so with Retry-After, and health
  turns unready while it restarts; nothing waits forever, nothing answers 500.
  (Recovery: tests/reliability/test_serving_faults.py.)"""
  from serving import device as device_lib  # pylint: disable=g-import-not-at-top
  from serving import server as server_lib  # pylint: disable=g-import-not-at-top
  slow = device_lib.Backoff(first=30)  # stays down for the length of this test
  server = start_server(bundles["sasrec"], buckets=(1, 2), backoff=slow)
  assert server.post({"instances": [{"items": [1000]}]})[0] == 200
  device = server_lib.app_state(server.app)["supervisor"].device
  device.process.kill()
  device.process.join(10)
  for route, data in (("/predict", b'{"instances": [{"items": [1000]}]}'), ("/health", None)):
    status, body, headers = request("POST" if data else "GET", server.url + route, data,
                                    with_headers=True)
    assert status == 503 and "device process" in body["error"], body
    assert "SIGKILL" in body["error"] and int(headers["Retry-After"]) >= 1, (body, headers)
