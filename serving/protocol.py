"""The request and response format of ``POST /predict`` (Vertex AI's ``instances`` form)::

    {"instances": [{"items": [1193, 661, 914], "k": 10, "exclude_history": true,
                    "timestamps": [978300760, 978302109, 978301968],
                    "query_timestamp": 978302200}],
     "parameters": {"k": 20}}                                    (optional defaults)
    -> {"predictions": [{"items": [2355, 1197, ...], "scores": [0.41, 0.39, ...]}]}

An instance: ``items`` (required) the user's recent raw item ids, oldest first, at most
the model's ``max_len``; unknown ids map to the OOV bucket. ``k`` (default 10, at most
the bundle's ``max_k``). ``exclude_history`` (default true): items of the history are
not recommended. ``timestamps`` (optional, unix seconds aligned with ``items``, int64:
any integer in [0, 2**63)) and ``query_timestamp`` (optional, the time of the
recommendation). Defaults for time-aware models (HSTU): the query time is the request's
arrival time; without ``timestamps`` every item is taken to be as recent as the query
(all time gaps zero). SASRec ignores time.
Scores are the trainer's (cosine similarity of user and item vectors); fewer than ``k``
items come back only when the history excludes nearly the whole catalogue.

Ranking bundles (DLRM v2, DCNv2; ``"task": "ranking"`` in ``bundle.json``) take rows
of raw feature values and answer click probabilities::

    {"instances": [{"features": {"user": "204", "item": "4798", "daytime": "5041"}},
                   {"features": {"user": "42", "weekday": "5047"},
                    "candidates": [{"item": "1572"}, {"item": "4798"}, {"item": "12"}]}]}
    -> {"predictions": [{"score": 0.91},
                        {"scores": [{"candidate": 2, "score": 0.63},
                                    {"candidate": 0, "score": 0.41},
                                    {"candidate": 1, "score": 0.07}]}]}

An instance: ``features`` (an object: raw feature name -> raw value, the names of the
dataset's columns) and, to rank a candidate list, ``candidates`` (a list of objects, at
most ``Limits.max_candidates``: ``--max-candidates``, default 1000): candidate ``j`` is
the row ``features`` + ``candidates[j]`` (shared user/context features once, item
features per candidate; a feature may not be in both). A plain instance answers
``score``, its click probability; a candidate list answers ``scores``, every
candidate's index in the request and probability, by descending score (ties: the
earlier candidate first). Values are mapped as in training
(:func:`trainers.ranking_features.transform_rows`, on the bundle's own vocabularies and
statistics): categorical values are text or integers (a value missing from a feature's
vocabulary is out-of-vocabulary; hashed features hash any value), dense values numbers
or numeric text, multi-hot values lists (or text split at the dataset's separator). A
feature that is absent, null or ``""`` is missing, as an empty field is in training:
the missing indicator for dense features, the ``<missing>`` value for categorical ones.
An unknown feature name or a value of the wrong type (text for a dense feature; a
float, boolean, list or object for a categorical one) gets a 400 naming the instance,
the candidate and the feature. Ranking requests take no ``parameters``. The score is
the trainer's ``sigmoid(model logit)`` for the same row.

A malformed request gets a 400 whose ``error`` says what is wrong (a body over
``Limits.max_body_bytes`` a 413); nothing in a request is executed or unpickled.
:func:`parse_body` turns a body into :class:`Row` s (ranking: :class:`RankingRow` s),
:func:`prediction` a row's top-K (ranking: its sorted scores) into its answer.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from typing import Any

import numpy as np

DEFAULT_K = 10
TIMESTAMP_MAX = 2**63 - 1  # unix seconds, as int64
INSTANCE_KEYS = ("items", "k", "exclude_history", "timestamps", "query_timestamp")
PARAMETER_KEYS = ("k", "exclude_history")
RANKING_INSTANCE_KEYS = ("features", "candidates")


@dataclasses.dataclass(frozen=True)
class Limits:
  """What a request may hold; beyond these it gets a 400 (a body too large: 413)."""

  max_body_bytes: int = 1 << 20
  max_instances: int = 64
  max_id_chars: int = 256
  max_candidates: int = 1000    # ranking: candidates of one instance


class RequestError(ValueError):
  """A malformed request (answered with ``status`` and this message)."""

  status = 400


class PayloadTooLarge(RequestError):
  status = 413


@dataclasses.dataclass
class Row:
  """One parsed instance, oldest first: ``[n]`` int32 item indices, int64 unix seconds."""

  items: np.ndarray
  timestamps: np.ndarray
  query_timestamps: np.ndarray
  exclude_history: bool
  k: int


@dataclasses.dataclass
class RankingRow:
  """One parsed ranking instance: the model inputs of its ``n`` rows (one, or one per
  candidate), ``{input name: [n, ...]}`` in the bundle's signature order."""

  inputs: dict[str, np.ndarray]
  n: int
  candidates: bool              # a candidate list (answered sorted) or a single row

  @property
  def k(self) -> int:
    """The results the device returns for this row: one score per candidate."""
    return self.n


_ID_TYPES = frozenset((int, str))
_NON_JSON_CONSTANT = re.compile(rb"-?\b(?:NaN|Infinity)\b")
_INT_TYPE = {int}


def _is_int(x: Any) -> bool:
  return type(x) is int  # pylint: disable=unidiomatic-typecheck  (bool is an int subclass)


def _timestamp(value: Any, where: str) -> int:
  if not _is_int(value) or not 0 <= value <= TIMESTAMP_MAX:
    raise RequestError(f"{where} must be an integer unix time in seconds in "
                       f"[0, 2**63 - 1], got {json.dumps(value)[:40]}")
  return value


def parse_body(body: bytes, bundle, limits: Limits, now: int | None = None) -> list[Row]:
  """Validates a ``{"instances": [...]}`` body; raises :class:`RequestError` with the reason."""
  import orjson  # pylint: disable=g-import-not-at-top  (serve extra only)
  if len(body) > limits.max_body_bytes:
    raise PayloadTooLarge(f"payload too large: {len(body)} bytes > {limits.max_body_bytes}")
  try:  # strict RFC 8259: NaN/Infinity, bad UTF-8, ints beyond 64 bits, deep nesting fail
    payload = orjson.loads(body)
  except orjson.JSONDecodeError as e:
    constant = _NON_JSON_CONSTANT.search(body)
    if constant:
      raise RequestError(f"body is not valid JSON: {constant.group().decode()} is not a JSON "
                         "number") from None
    raise RequestError(f"body is not valid JSON: {str(e)[:200]}") from None
  if not isinstance(payload, dict):
    raise RequestError('body must be a JSON object {"instances": [...]}')
  unknown = sorted(set(payload) - {"instances", "parameters"})
  if unknown:
    raise RequestError(f"unknown top-level field(s) {unknown[:5]}; expected 'instances' "
                       "(and optional 'parameters')")
  instances = payload.get("instances")
  if not isinstance(instances, list):
    raise RequestError('"instances" must be a list of objects')
  if not instances:
    raise RequestError('"instances" is empty')
  if len(instances) > limits.max_instances:
    raise RequestError(f'too many instances: {len(instances)} > {limits.max_instances}')
  params = payload.get("parameters", {})
  if not isinstance(params, dict):
    raise RequestError('"parameters" must be an object')
  if getattr(bundle, "task", "retrieval") == "ranking":
    if params:
      raise RequestError(f"unknown parameter(s) {sorted(params)[:5]}: ranking requests "
                         "take none")
    return parse_ranking(instances, bundle, limits)
  unknown = sorted(set(params) - set(PARAMETER_KEYS))
  if unknown:
    raise RequestError(f"unknown parameter(s) {unknown[:5]}; known: {list(PARAMETER_KEYS)}")
  defaults = {"k": DEFAULT_K, "exclude_history": True}
  defaults.update(_options(params, bundle, "parameters"))
  now = int(time.time()) if now is None else now
  return [_parse_instance(inst, i, bundle, limits, defaults, now)
          for i, inst in enumerate(instances)]


def _options(obj: dict[str, Any], bundle, where: str) -> dict[str, Any]:
  out = {}
  if "k" in obj:
    k = obj["k"]
    if not _is_int(k) or not 1 <= k <= bundle.max_k:
      raise RequestError(f"{where}.k must be an integer in [1, {bundle.max_k}], "
                         f"got {json.dumps(k)[:40]}")
    out["k"] = k
  if "exclude_history" in obj:
    if not isinstance(obj["exclude_history"], bool):
      raise RequestError(f"{where}.exclude_history must be true or false, "
                         f"got {json.dumps(obj['exclude_history'])[:40]}")
    out["exclude_history"] = obj["exclude_history"]
  return out


def _parse_instance(inst: Any, i: int, bundle, limits: Limits, defaults: dict[str, Any],
                    now: int) -> Row:
  where = f"instances[{i}]"
  if not isinstance(inst, dict):
    raise RequestError(f'{where} must be an object like {{"items": [...], "k": 10}}')
  unknown = sorted(set(inst) - set(INSTANCE_KEYS))
  if unknown:
    raise RequestError(f"{where}: unknown field(s) {unknown[:5]}; known: {list(INSTANCE_KEYS)}")
  items = inst.get("items")
  if not isinstance(items, list):
    raise RequestError(f'{where}.items must be a list of raw item ids (strings or integers)')
  if not items:
    raise RequestError(f"{where}.items is empty: send at least one recent item id")
  if len(items) > bundle.max_len:
    raise RequestError(f"{where}.items has {len(items)} ids; this model takes at most "
                       f"{bundle.max_len} (send the most recent)")
  kinds = set(map(type, items))
  if not kinds <= _ID_TYPES or (str in kinds and max(
      len(r) for r in items if type(r) is str) > limits.max_id_chars):  # pylint: disable=unidiomatic-typecheck
    for j, raw in enumerate(items):  # the slow path only finds the first bad id
      if isinstance(raw, str):
        if len(raw) > limits.max_id_chars:
          raise RequestError(f"{where}.items[{j}] is longer than {limits.max_id_chars} "
                             "characters")
      elif not _is_int(raw):
        raise RequestError(f"{where}.items[{j}] must be a string or an integer, "
                           f"got {json.dumps(raw)[:40]}")
  opts = {**defaults, **_options(inst, bundle, where)}
  query = now
  if "query_timestamp" in inst:
    query = _timestamp(inst["query_timestamp"], f"{where}.query_timestamp")
  if "timestamps" in inst:
    ts = inst["timestamps"]
    if not isinstance(ts, list) or len(ts) != len(items):
      raise RequestError(f"{where}.timestamps must be a list of {len(items)} integers "
                         "(one per item)")
    if not (set(map(type, ts)) == _INT_TYPE and 0 <= min(ts) and max(ts) <= TIMESTAMP_MAX):
      ts = [_timestamp(t, f"{where}.timestamps[{j}]") for j, t in enumerate(ts)]
    ts = np.array(ts, np.int64)
  else:
    ts = np.full(len(items), query, np.int64)
  qts = np.empty_like(ts)
  qts[:-1], qts[-1] = ts[1:], query
  return Row(items=np.array(bundle.lookup(items), np.int32), timestamps=ts,
             query_timestamps=qts, exclude_history=opts["exclude_history"], k=opts["k"])


def parse_ranking(instances: list[Any], bundle, limits: Limits) -> list[RankingRow]:
  """Ranking instances -> :class:`RankingRow` s (one transform for the whole request)."""
  rows: list[dict[str, Any]] = []     # every raw row of the request
  where: list[str] = []               # and the instance (and candidate) it comes from
  spans = []
  for i, inst in enumerate(instances):
    at = f"instances[{i}]"
    if not isinstance(inst, dict):
      raise RequestError(f'{at} must be an object like {{"features": {{"user": "..."}}}}')
    unknown = sorted(set(inst) - set(RANKING_INSTANCE_KEYS))
    if unknown:
      raise RequestError(f"{at}: unknown field(s) {unknown[:5]}; known: "
                         f"{list(RANKING_INSTANCE_KEYS)}")
    if not inst:
      raise RequestError(f'{at} is empty: send "features" (and optionally "candidates")')
    shared = inst.get("features", {})
    if not isinstance(shared, dict):
      raise RequestError(f"{at}.features must be an object of raw feature values")
    start = len(rows)
    if "candidates" not in inst:
      rows.append(shared)
      where.append(at)
    else:
      candidates = inst["candidates"]
      if not isinstance(candidates, list) or not candidates:
        raise RequestError(f"{at}.candidates must be a non-empty list of objects")
      if len(candidates) > limits.max_candidates:
        raise RequestError(f"{at}.candidates has {len(candidates)} entries; at most "
                           f"{limits.max_candidates}")
      for j, candidate in enumerate(candidates):
        if not isinstance(candidate, dict):
          raise RequestError(f"{at}.candidates[{j}] must be an object of raw feature values")
        both = sorted(set(candidate) & set(shared))
        if both:
          raise RequestError(f"{at}.candidates[{j}]: feature {both[0]!r} is also in "
                             f"{at}.features (give each feature once)")
        rows.append({**shared, **candidate})
        where.append(f"{at}.candidates[{j}]")
    spans.append((start, len(rows), "candidates" in inst))
  try:
    inputs = bundle.transform(rows)
  except ValueError:
    raise RequestError(_first_bad_row(bundle, rows, where)) from None
  return [RankingRow(inputs={k: v[a:b] for k, v in inputs.items()}, n=b - a, candidates=c)
          for a, b, c in spans]


def _first_bad_row(bundle, rows: list[dict[str, Any]], where: list[str]) -> str:
  """The error of the first row the transform rejects, named by its place in the
  request (the slow path: one row at a time)."""
  for row, at in zip(rows, where):
    try:
      bundle.transform([row])
    except ValueError as e:
      message = str(e).removeprefix("row 0: ")
      return f"{at}: {message[:300]}"
  return "the request's features cannot be transformed"


def prediction(bundle, row: Row | RankingRow, scores: np.ndarray, ids: np.ndarray
               ) -> dict[str, Any]:
  """One row's answer: its top ``k`` as raw ids and scores, excluded ones (-inf) dropped;
  ranking: its score, or its candidates' scores (``ids``: candidate indices, by
  descending score)."""
  if isinstance(row, RankingRow):
    if not row.candidates:
      return {"score": float(scores[0])}
    return {"scores": [{"candidate": int(c), "score": float(s)}
                       for s, c in zip(scores[:row.n], ids[:row.n])]}
  keep = np.isfinite(scores[:row.k])
  return {"items": bundle.raw_ids(ids[:row.k][keep]),
          "scores": [float(s) for s in scores[:row.k][keep]]}
