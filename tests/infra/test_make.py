"""The Makefile's verbs and infra/test.sh's tiers: each tier target has a recipe, the tier
selections (read from infra/test.sh, where they live) split the suite exactly, and
`make clean` keeps the run history. Fast: dry runs, collection only, stub tools."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
TIERS = ("unit", "integration", "container")
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _selection() -> dict[str, str]:
  """{tier: pytest -m expression}, as infra/test.sh prints them, in run order."""
  out = subprocess.run(["bash", "infra/test.sh", "--print-selection"], cwd=ROOT,
                       capture_output=True, text=True, check=True, timeout=30).stdout
  return dict(line.split("\t", 1) for line in out.splitlines())


@needs_make
@pytest.mark.parametrize("tier", TIERS)
def test_tier_target_has_a_recipe(tier):
  result = subprocess.run(["make", "-n", f"test-{tier}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
  out = result.stdout + result.stderr
  assert result.returncode == 0, out
  assert "Nothing to be done" not in out
  assert f"infra/test.sh {tier}" in out, out


@needs_make
def test_make_test_runs_every_tier_through_test_sh():
  out = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, check=True).stdout
  recipe = [line for line in out.splitlines() if "infra/test.sh" in line]
  assert len(recipe) == 1, out
  assert not any(tier in recipe[0].split() for tier in TIERS), recipe  # no tier: all of them


def test_tier_selections_split_the_suite():
  selection = _selection()
  assert tuple(selection) == TIERS
  pytest_bin = [sys.executable, "-m", "pytest"]

  def collect(*marker: str) -> subprocess.Popen:
    return subprocess.Popen([*pytest_bin, "--collect-only", "-q", "-p", "no:cacheprovider",
                             *marker], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

  runs = {tier: collect("-m", expr) for tier, expr in selection.items()}
  runs["*"] = collect()
  ids = {}
  for name, proc in runs.items():
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{name}: {out[-3000:]}"
    ids[name] = {line for line in out.splitlines() if "::" in line and not line.startswith(" ")}
  everything = ids.pop("*")
  for tier, found in ids.items():
    assert found, f"tier {tier} ({selection[tier]!r}) selects no test"
  for i, a in enumerate(TIERS):
    for b in TIERS[i + 1:]:
      both = ids[a] & ids[b]
      assert not both, f"tiers {a} and {b} both select {sorted(both)[:5]}"
  union = set().union(*ids.values())
  assert union == everything, f"in no tier: {sorted(everything - union)[:5]}"


def test_print_selection_of_one_tier_and_unknown_tier():
  out = subprocess.run(["bash", "infra/test.sh", "--print-selection", "container"], cwd=ROOT,
                       capture_output=True, text=True, check=True, timeout=30).stdout
  assert out == f"container\t{_selection()['container']}\n"
  bad = subprocess.run(["bash", "infra/test.sh", "--print-selection", "nope"], cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
  assert bad.returncode != 0 and "unknown tier" in bad.stderr


@needs_make
def test_clean_keeps_runs_and_clean_runs_removes_them(tmp_path):
  shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
  (tmp_path / "runs").mkdir()
  (tmp_path / "runs/metrics.duckdb").write_bytes(b"history")
  for folder in ("build/lib", "dist", "recml.egg-info", ".pytest_cache/v", "workdirs/bench"):
    (tmp_path / folder).mkdir(parents=True)
  (tmp_path / ".venv").mkdir()
  (tmp_path / "keep.py").write_text("")

  subprocess.run(["make", "clean"], cwd=tmp_path, check=True, capture_output=True, timeout=60)
  assert (tmp_path / "runs/metrics.duckdb").read_bytes() == b"history"
  for gone in ("build", "dist", "recml.egg-info", ".pytest_cache", "workdirs"):
    assert not (tmp_path / gone).exists(), gone
  assert (tmp_path / ".venv").is_dir() and (tmp_path / "keep.py").exists()

  subprocess.run(["make", "clean-runs"], cwd=tmp_path, check=True, capture_output=True,
                 timeout=60)
  assert not (tmp_path / "runs").exists()
  assert (tmp_path / ".venv").is_dir() and (tmp_path / "keep.py").exists()


# --- infra/test.sh's control flow, with a stub pytest and a stub engine bootstrap --------

STUB_PYTEST = """#!/usr/bin/env bash
# Records each call; --collect-only lists one test per tier; FAIL_TIER's run fails.
echo "$*" >> "$STUB_LOG"
m=""; prev=""
for a in "$@"; do [ "$prev" = -m ] && m=$a; prev=$a; done
if [[ " $* " == *" --collect-only "* ]]; then echo "tests/test_x.py::test_${m// /_}"; exit 0; fi
[ "$m" != "${FAIL_TIER:-}" ] || exit 1
exit 0
"""


def _test_sh(tmp_path, *args, engine_ok: bool, ci: str = "false", fail_expr: str = ""):
  """Runs a copy of infra/test.sh whose pytest and bootstrap_docker.sh are stubs."""
  (tmp_path / "infra").mkdir(exist_ok=True)
  shutil.copy(ROOT / "infra/test.sh", tmp_path / "infra/test.sh")
  (tmp_path / "infra/bootstrap_docker.sh").write_text(
      f"echo bootstrap called >> \"$STUB_LOG\"; exit {0 if engine_ok else 1}\n")
  stub = tmp_path / "pytest"
  stub.write_text(STUB_PYTEST)
  stub.chmod(0o755)
  log = tmp_path / "log"
  log.write_text("")
  tools = tmp_path / "bin"  # shellcheck and chromium "present": no apt-get from a test
  tools.mkdir(exist_ok=True)
  for tool in ("shellcheck", "chromium"):
    (tools / tool).write_text("#!/bin/sh\n")
    (tools / tool).chmod(0o755)
  env = dict(os.environ, PYTEST=str(stub), CI=ci, STUB_LOG=str(log), FAIL_TIER=fail_expr,
             PATH=f"{tools}:{os.environ['PATH']}")
  result = subprocess.run(["bash", str(tmp_path / "infra/test.sh"), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
  runs = [line for line in log.read_text().splitlines() if "--collect-only" not in line]
  return result, runs


def test_test_sh_runs_every_tier_in_order_with_banners(tmp_path):
  sel = _selection()
  result, runs = _test_sh(tmp_path, "-k", "x", engine_ok=True)
  assert result.returncode == 0, result.stderr
  assert runs == ["bootstrap called"] + [f"-q -m {sel[t]} -k x" for t in TIERS]
  for tier in TIERS:
    assert f"test.sh: tier {tier} (1 tests)" in result.stderr


def test_test_sh_without_engine_skips_container_tier_outside_ci(tmp_path):
  sel = _selection()
  result, runs = _test_sh(tmp_path, engine_ok=False)
  assert result.returncode == 0, result.stderr
  assert runs == ["bootstrap called", f"-q -m {sel['unit']}", f"-q -m {sel['integration']}"]
  assert "SKIPPING the container tier" in result.stderr


@pytest.mark.parametrize("args", [(), ("container",)])
def test_test_sh_without_engine_fails_in_ci_and_for_the_container_tier(tmp_path, args):
  ci = "false" if args else "true"
  result, runs = _test_sh(tmp_path, *args, engine_ok=False, ci=ci)
  assert result.returncode == 1
  assert runs == ["bootstrap called"]  # before any test ran
  assert "ERROR" in result.stderr and "Docker engine" in result.stderr


def test_test_sh_single_tier_and_failure_status(tmp_path):
  sel = _selection()
  result, runs = _test_sh(tmp_path, "unit", engine_ok=False)
  assert result.returncode == 0, result.stderr
  assert runs == [f"-q -m {sel['unit']}"]  # no engine bootstrap for the unit tier

  result, runs = _test_sh(tmp_path, engine_ok=True, fail_expr=sel["unit"])
  assert result.returncode == 1
  assert len(runs) == 4  # a failed tier does not stop the others...
  assert "unit FAILED" in result.stderr
  result, runs = _test_sh(tmp_path, "-x", engine_ok=True, fail_expr=sel["unit"])
  assert result.returncode == 1 and len(runs) == 2  # ...unless -x
