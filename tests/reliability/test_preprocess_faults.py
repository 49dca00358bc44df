"""Faults injected into copies of real data, against the preprocessing step (issue 10).

Each test reproduces a failure of the step as it was: one timestamp above 2**63
crashed the Beam job; non-numeric and 26-digit ids in u.data were kept (fake
users and items); millisecond timestamps passed as seconds; a folder holding
``u.data`` and ``ratings.csv`` read only ``u.data``; a rejected or killed run
destroyed the previous dataset at the same ``--output``.

References are independent of the step: the clean rows are known before the
garbage is injected, and ``check_against_reference`` (tests/components/preprocess)
recomputes vocabularies and splits from them in plain Python; pandas counts the
users and items.

:func:`measure_faults` is the reusable measurement (for benchmarks): it injects
garbage of every kind into a sample of ml-100k, runs the step and returns the
injected / quarantined / lost counts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from components.preprocess import BadInputError, InputError, run, sources
from tests.components.preprocess.preprocess_testlib import (
    REPO, check_against_reference, read_split, shared, tree_digest)
from trainers import features

SAMPLE_ROWS = 10_000
MAX_LEN = 200   # longer than any user's history in the sample: nothing truncated


def _garbage(kind: str, row: list[str], rng: random.Random) -> list[str]:
  """A copy of a clean u.data row (user, item, rating, ts) with one field broken."""
  user, item, rating, ts = row
  big = str(rng.randrange(10**25, 10**26))  # 26 digits
  if kind == "non-numeric user id":
    user = rng.choice(["n/a", "1e5", "user_12"])  # few values: kept, they make users
  elif kind == "user id out of int64 range":
    user = rng.choice([big, "99999999999999999999999999"])
  elif kind == "non-numeric item id":
    item = rng.choice(["?", "0x1F", "12.0"])
  elif kind == "item id out of int64 range":
    item = rng.choice([big, "12345678901234567890123456"])
  elif kind == "non-numeric timestamp":
    ts = rng.choice(["88125x949", "2000-01-01", "1_000"])
  elif kind == "negative timestamp":
    ts = "-" + ts
  elif kind == "timestamp out of int64 range":
    ts = str(2**63 + rng.randrange(10**6))
  elif kind == "timestamp out of range":
    ts = str(int(ts) * 1000)  # one millisecond row among seconds
  else:
    raise ValueError(kind)
  return [user, item, rating, ts]


KINDS = ("non-numeric user id", "user id out of int64 range", "non-numeric item id",
         "item id out of int64 range", "non-numeric timestamp", "negative timestamp",
         "timestamp out of int64 range", "timestamp out of range")


def sample_rows(n: int = SAMPLE_ROWS, seed: int = 0) -> list[list[str]]:
  """``n`` rows of ml-100k ``u.data`` drawn at random, in file order."""
  with open(shared("ml-100k") / "u.data", encoding="utf-8") as f:
    rows = [line.rstrip("\n").split("\t") for line in f]
  keep = sorted(random.Random(seed).sample(range(len(rows)), n))
  return [rows[i] for i in keep]


def inject(clean: list[list[str]], fraction: float, seed: int = 0,
           kinds: tuple[str, ...] = KINDS):
  """Clean rows with ``fraction`` garbage rows (``kinds`` in equal shares) inserted.

  Returns:
    (all rows, {1-based line: kind} of the garbage rows).
  """
  rng = random.Random(seed)
  per_kind = max(1, round(len(clean) * fraction / len(kinds)))
  garbage = [(kind, _garbage(kind, rng.choice(clean), rng))
             for kind in kinds for _ in range(per_kind)]
  rng.shuffle(garbage)
  total = len(clean) + len(garbage)
  bad = dict(zip(sorted(rng.sample(range(1, total + 1), len(garbage))),
                 (kind for kind, _ in garbage)))
  # Clean rows keep their order (it breaks timestamp ties); garbage goes in between.
  clean_rows, garbage_rows = iter(clean), iter(row for _, row in garbage)
  rows = [next(garbage_rows) if line in bad else next(clean_rows)
          for line in range(1, total + 1)]
  return rows, bad


def write_tsv(path, rows) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")


def pandas_reference(clean: list[list[str]]) -> dict[str, int]:
  """Users with >= MIN_EVENTS_PER_USER events and distinct items, by pandas."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  df = pd.DataFrame(clean, columns=["user", "item", "rating", "ts"])
  per_user = df.groupby("user").size()
  return {"rows": len(df), "users": int((per_user >= features.MIN_EVENTS_PER_USER).sum()),
          "items": int(df["item"].nunique())}


def quarantine_rows(out_dir) -> list[dict]:
  rows = []
  folder = os.path.join(out_dir, "quarantine")
  for name in sorted(os.listdir(folder)):
    rows += list(sources.iter_jsonl(os.path.join(folder, name)))
  return rows


def measure_faults(work_dir, rows: int = SAMPLE_ROWS, fraction: float = 0.05,
                   seed: int = 0, max_len: int = MAX_LEN) -> dict:
  """Injects garbage of every kind into a sample of ml-100k and runs the step.

  Args:
    work_dir: a scratch folder (input copy and output are written there).
    rows: clean rows sampled from ml-100k ``u.data``.
    fraction: garbage rows per clean row (split evenly over ``KINDS``).
    seed: sampling and injection seed.
    max_len: the step's ``max_len``.

  Returns:
    ``injected``, ``quarantined`` and ``lost`` (clean rows not kept) counts, the
    same per kind, ``users`` / ``items`` of the dataset and of the clean
    reference, ``seconds`` of the step, and the paths used.
  """
  clean = sample_rows(rows, seed)
  all_rows, bad = inject(clean, fraction, seed)
  path = os.path.join(work_dir, "ml-100k-faults", "u.data")
  write_tsv(pathlib.Path(path), all_rows)
  out = os.path.join(work_dir, "out")
  result = run(os.path.dirname(path), out, max_len=max_len,
               bad_rows_threshold=2 * fraction)
  ref = pandas_reference(clean)
  injected_by_kind = {k: list(bad.values()).count(k) for k in KINDS}
  return {
      "rows": len(all_rows), "injected": len(bad),
      "quarantined": result.counts["rows_quarantined"],
      "lost": ref["rows"] - result.counts["rows_kept"],
      "injected_by_kind": injected_by_kind,
      "quarantined_by_kind": dict(result.info.quarantine),
      "users": result.info.num_users, "users_expected": ref["users"],
      "items": result.info.num_items, "items_expected": ref["items"],
      "seconds": result.seconds, "input": path, "output": out, "bad_lines": bad,
      "clean": clean, "result": result,
  }


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
  work = tmp_path_factory.mktemp("faults")
  # A work folder left by a crashed run (and a half-swapped backup) must not break
  # the next run nor leak into its output.
  for leftover in ("out.partial/train", "out.previous/train"):
    (work / leftover).mkdir(parents=True)
    (work / leftover / "part-00000-of-00009.tfrecord.gz").write_bytes(b"junk")
  return measure_faults(work)


@pytest.mark.integration
def test_garbage_of_every_kind_is_quarantined_and_nothing_clean_is_lost(faults):
  assert faults["injected"] == 496 and faults["rows"] == 10_496
  assert faults["quarantined"] == faults["injected"]
  assert faults["quarantined_by_kind"] == faults["injected_by_kind"]
  assert faults["lost"] == 0
  assert (faults["users"], faults["items"]) == (faults["users_expected"],
                                                faults["items_expected"])
  # every quarantined row is an injected one, with its file, line and kind
  rows = quarantine_rows(faults["output"])
  assert {r["line"]: sources.reason_kind(r["reason"]) for r in rows} == faults["bad_lines"]
  assert {r["file"] for r in rows} == {faults["input"]}
  # the dataset equals the one made from the clean rows alone (pure Python)
  clean = faults["clean"]
  check_against_reference(faults["output"], [r[0] for r in clean], [r[1] for r in clean],
                          [int(r[3]) for r in clean], max_len=MAX_LEN)


@pytest.mark.integration
def test_quarantine_counts_reach_dataset_info_and_summary(faults):
  out = faults["output"]
  with open(os.path.join(out, features.DATASET_INFO_FILE), encoding="utf-8") as f:
    info = json.load(f)
  assert info["quarantine"] == faults["injected_by_kind"]
  assert info["counts"]["rows_quarantined"] == 496
  assert info["source_timestamp_unit"] == "s"
  markdown = faults["result"].markdown
  for kind, n in faults["injected_by_kind"].items():
    assert f"| quarantined: {kind} | {n:,} |" in markdown
  assert faults["result"].metrics()["quarantined_timestamp_out_of_int64_range"] == 62
  # the crashed run's leftovers are gone, not merged into the output
  assert not os.path.exists(out + ".partial") and not os.path.exists(out + ".previous")
  assert sorted(os.listdir(os.path.join(out, "train"))) == ["part-00000-of-00001.tfrecord.gz"]


@pytest.fixture(scope="module")
def millis(tmp_path_factory):
  """The clean sample with timestamps in milliseconds, sub-second parts random."""
  rng = random.Random(1)
  rows = [[u, i, r, str(int(t) * 1000 + rng.randrange(1000))] for u, i, r, t in sample_rows()]
  work = tmp_path_factory.mktemp("millis")
  write_tsv(work / "ml-100k-ms" / "u.data", rows)
  result = run(str(work / "ml-100k-ms"), str(work / "out"), max_len=MAX_LEN)
  return rows, work, result


@pytest.mark.integration
def test_millisecond_timestamps_are_detected_and_written_as_seconds(millis):
  rows, work, result = millis
  assert result.info.source_timestamp_unit == "ms"
  assert result.info.params["timestamp_unit"] == "auto"
  assert result.counts["rows_quarantined"] == 0
  # Reference: events ordered by their milliseconds (input order on ties), which is
  # what sorting the input by milliseconds and keeping seconds gives.
  order = sorted(range(len(rows)), key=lambda k: (int(rows[k][3]), k))
  check_against_reference(work / "out", [rows[k][0] for k in order],
                          [rows[k][1] for k in order],
                          [int(rows[k][3]) // 1000 for k in order], max_len=MAX_LEN)


def test_units_by_the_median_rule():
  assert sources.detect_timestamp_unit([881250949, 0, 5]) == ("s", 5.0)
  assert sources.detect_timestamp_unit([1_700_000_000_000] * 3)[0] == "ms"
  assert sources.detect_timestamp_unit([1_700_000_000_000_000])[0] == "us"
  assert sources.detect_timestamp_unit([1_700_000_000_000_000_000])[0] == "ns"
  assert sources.detect_timestamp_unit([]) == ("s", None)


@pytest.mark.integration
def test_rejected_run_leaves_the_previous_dataset_byte_identical(millis, tmp_path):
  _, work, _ = millis
  out = tmp_path / "out"
  shutil.copytree(work / "out", out)
  (out / "notes.txt").write_text("kept")  # not the step's: survives every run
  before = tree_digest(out)
  # 5% non-numeric timestamps, above the default 1% threshold
  rows, bad = inject(sample_rows(), 0.05, kinds=("non-numeric timestamp",))
  write_tsv(tmp_path / "bad" / "u.data", rows)
  with pytest.raises(BadInputError, match=r"500 of 10500 rows \(4.76%\)") as e:
    run(str(tmp_path / "bad"), str(out), max_len=MAX_LEN)
  assert tree_digest(out) == before
  assert f"{out}.partial/quarantine/" in str(e.value)
  assert sorted(r["line"] for r in quarantine_rows(f"{out}.partial")) == sorted(bad)


@pytest.mark.integration
def test_killed_cli_run_leaves_the_previous_dataset(millis, tmp_path):
  """SIGKILL in the middle of a run (``recml preprocess``, a real process)."""
  _, work, _ = millis
  out = tmp_path / "out"
  shutil.copytree(work / "out", out)
  before = tree_digest(out)
  proc = subprocess.Popen(
      [sys.executable, "-m", "pipelines.cli", "preprocess", "--input",
       str(work / "ml-100k-ms"), "--output", str(out), "--max-len", str(MAX_LEN)],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.monotonic() + 120
  # Wait until the run writes Beam output (the old step had deleted the previous
  # dataset by then).
  while time.monotonic() < deadline and proc.poll() is None:
    if (tmp_path / "out.partial" / ".tmp").exists() or not (
        out / features.DATASET_INFO_FILE).exists():
      break
    time.sleep(0.05)
  assert proc.poll() is None, proc.communicate()[0][-3000:]
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert tree_digest(out) == before


@pytest.mark.integration
def test_declared_unit_through_the_cli_and_per_row_checks(tmp_path, capsys):
  """``--timestamp-unit ms`` is used as declared; ms declared as s are quarantined."""
  import argparse  # pylint: disable=g-import-not-at-top
  from components.preprocess import cli  # pylint: disable=g-import-not-at-top
  folder = tmp_path / "tiny"
  rows = [[u, i, "3", str(t)] for u, i, t in (("1", "10", 1_500), ("1", "11", 2_999),
                                               ("1", "12", 3_000), ("2", "10", 9_000))]
  write_tsv(folder / "u.data", rows)
  parser = argparse.ArgumentParser()
  cli.register(parser.add_subparsers())
  args = parser.parse_args(["preprocess", "--input", str(folder), "--output",
                            str(tmp_path / "out"), "--timestamp-unit", "ms", "--json"])
  assert args.func(args) == 0
  assert json.loads(capsys.readouterr().out)["source_timestamp_unit"] == "ms"
  info = features.load_dataset_info(str(tmp_path / "out"))
  assert info.params["timestamp_unit_resolved"] == "declared"
  test = read_split(tmp_path / "out", "test")
  assert [(ex["timestamps"], ex["target_timestamp"]) for ex in test] == [([1, 2], [3])]

  path = tmp_path / "u.data"
  path.write_text("1\t10\t3\t881250949000\n1\t11\t3\t881250949\n")
  spec = sources.SourceSpec("ml-100k", timestamp_unit="s")
  chunks = list(sources.read_file(str(path), 0, spec))
  assert [(r["line"], r["reason"]) for r in chunks[0].bad_rows] == [
      (1, "timestamp out of range: 881250949000 s is after the year 5138; "
          "check --timestamp-unit")]
  ms = list(sources.read_file(str(path), 0, dataclasses.replace(spec, timestamp_unit="ms")))
  assert [v[0] for v in ms[0].batch.column("timestamp").to_pylist()] == [
      881250949000, 881250949]  # the pipeline divides by 1000 when writing examples


def test_folder_with_two_formats_is_an_error_naming_files_and_formats(tmp_path):
  folder = tmp_path / "mixed"
  rows = sample_rows(300)
  write_tsv(folder / "u.data", rows)
  (folder / "ratings.csv").write_text(
      "userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in rows))
  with pytest.raises(InputError) as e:
    run(str(folder), str(tmp_path / "out"))
  message = str(e.value)
  assert "ratings.csv (csv)" in message and "u.data (ml-100k)" in message
  assert "a single file" in message and "--format" in message
  assert not (tmp_path / "out").exists()
  # --format picks one format's files; same-format files are all read
  assert sources.resolve_input(str(folder), "ml-100k") == [
      (str(folder / "u.data"), (folder / "u.data").stat().st_size)]
  (folder / "ratings.csv").unlink()
  write_tsv(folder / "ratings_a.dat", [])
  with pytest.raises(InputError, match="u.data \\(ml-100k\\), ratings_a.dat \\(movielens\\)|"
                     "ratings_a.dat \\(movielens\\), u.data \\(ml-100k\\)"):
    sources.resolve_input(str(folder))
  (folder / "u.data").unlink()
  write_tsv(folder / "ratings_b.dat", [])
  assert [os.path.basename(p) for p, _ in sources.resolve_input(str(folder))] == [
      "ratings_a.dat", "ratings_b.dat"]


def test_typed_parquet_timestamps_out_of_range_are_quarantined_not_raised(tmp_path):
  """uint64 above 2**63, huge floats and sub-second timestamp[ms] once raised in Arrow."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  users = ["1", "2", "3", "4"]
  cases = {
      "u64": (pa.array([5, 2**63 + 5, 2**64 - 1, 7], pa.uint64()),
              [5, None, None, 7], "timestamp out of int64 range"),
      "f64": (pa.array([5.0, 1e19, -3e19, 7.5], pa.float64()),
              [5, None, None, None], None),
      "ms": (pa.array([1500, 2999, -1, 10**15], pa.timestamp("ms")),
             [1, 2, None, 10**12], "negative timestamp"),
  }
  for name, (column, expected, reason) in cases.items():
    path = tmp_path / f"{name}.parquet"
    pq.write_table(pa.table({"user": users, "item": users, "ts": column}), path)
    spec = sources.SourceSpec("parquet", sources.ColumnMapping(timestamp="ts"),
                              timestamp_unit="s")
    chunks = list(sources.read_file(str(path), 0, spec))
    kept = {v[0] for c in chunks if c.batch is not None
            for v in c.batch.column("user").to_pylist()}
    stamps = [v[0] for c in chunks if c.batch is not None
              for v in c.batch.column("timestamp").to_pylist()]
    bad = {r["line"]: r["reason"] for c in chunks for r in c.bad_rows}
    assert stamps == [t for t in expected if t is not None and t < 10**11], name
    assert len(kept) + len(bad) == 4, name
    if reason:
      assert reason in bad.values(), (name, bad)
  assert set(bad.values()) == {"negative timestamp", "timestamp out of range: 1000000000000 s "
                               "is after the year 5138; check --timestamp-unit"}


def test_bigquery_rows_with_huge_integers_are_quarantined_not_raised():
  rows = [{"user_id": 1, "item_id": "a", "ts": 10},
          {"user_id": 2, "item_id": "b", "ts": 2**63 + 3},
          {"user_id": 3, "item_id": "c", "ts": -5}]
  spec = sources.SourceSpec("bigquery", sources.ColumnMapping(timestamp="ts"),
                            timestamp_unit="s")
  chunk = sources.records_to_batch(rows, spec, "bq://p.d.t")
  assert [(r["line"], r["reason"]) for r in chunk.bad_rows] == [
      (None, "timestamp out of int64 range"), (None, "negative timestamp")]
  assert chunk.batch.column("timestamp").to_pylist() == [[10]]
