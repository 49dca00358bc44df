"""The validate gate: the same test bodies against DuckDB and a real local BigQuery emulator."""

from __future__ import annotations

import math

import pytest

from components import metrics_store
from components import validate
from components import write_metrics


def evaluated(backend, run_id, ndcg, mrr=0.05, dataset="ml-100k", model="sasrec",
              dataset_id=None, model_uri=None):
  """What the pipeline does before validate: write the run's evaluation metrics."""
  write_metrics.run(backend.uri, run_id, "recml", model, dataset,
                    {"valid": {"ndcg@10": ndcg, "mrr": mrr}, "test": {"ndcg@10": ndcg / 2}},
                    model_uri=model_uri or f"runs/{run_id}/model",
                    store_options=backend.options, dataset_id=dataset_id or f"ds-{dataset}")


def gate(backend, run_id, **kwargs):
  kwargs.setdefault("dataset", "ml-100k")
  kwargs.setdefault("model_family", "sasrec")
  return validate.run(backend.uri, run_id, store_options=backend.options, **kwargs)


def test_first_model_is_blessed_and_recorded(backend):
  evaluated(backend, "r1", 0.10)
  decision = gate(backend, "r1")
  assert decision["blessed"] is True and decision["decision"] == "blessed"
  assert decision["dataset_id"] == "ds-ml-100k"
  assert decision["champion_run_id"] is None and decision["champion_value"] is None
  assert decision["candidate_value"] == 0.10
  assert "first model" in decision["reason"]
  store = backend.open()
  (blessed,) = store.rows("r1", metric=metrics_store.BLESSED_METRIC)
  assert (blessed.value, blessed.split, blessed.k) == (1.0, "valid", None)
  assert blessed.model_uri == "runs/r1/model" and blessed.pipeline == "recml"
  assert blessed.labels["gate"]["reason"] == decision["reason"]
  assert blessed.dataset_id == "ds-ml-100k"
  assert store.champion("ds-ml-100k", "sasrec", "ndcg", 10).run_id == "r1"
  assert [r.blessed for r in store.runs()] == [True]


def test_better_is_blessed_equal_is_a_tie_and_not_champion(backend):
  evaluated(backend, "r1", 0.10)
  gate(backend, "r1")
  evaluated(backend, "r2", 0.12)
  better = gate(backend, "r2")
  assert better["blessed"] is True and better["decision"] == "blessed"
  assert (better["champion_run_id"], better["champion_value"]) == ("r1", 0.10)
  assert "0.12 > 0.1" in better["reason"]
  assert backend.open().champion("ds-ml-100k", "sasrec", "ndcg", 10).run_id == "r2"
  evaluated(backend, "r3", 0.12)
  equal = gate(backend, "r3")
  assert equal["decision"] == "tie" and equal["blessed"] is False
  assert equal["champion_run_id"] == "r2" and "tie: not redeployed" in equal["reason"]
  store = backend.open()
  assert [r.value for r in store.rows("r3", metric=metrics_store.BLESSED_METRIC)] == [0.5]
  # A tie is not deployed, so it never becomes the champion (even though it is newer).
  assert store.champion("ds-ml-100k", "sasrec", "ndcg", 10).run_id == "r2"
  by_id = {r.run_id: r for r in store.runs()}
  assert (by_id["r3"].decision, by_id["r3"].blessed) == ("tie", False)


def test_worse_candidate_is_rejected_and_never_becomes_champion(backend):
  evaluated(backend, "r1", 0.10)
  gate(backend, "r1")
  evaluated(backend, "r2", 0.09)
  decision = gate(backend, "r2")
  assert decision["blessed"] is False
  assert decision["champion_run_id"] == "r1" and decision["candidate_value"] == 0.09
  assert "0.09 < 0.1" in decision["reason"]
  store = backend.open()
  assert [r.value for r in store.rows("r2", metric=metrics_store.BLESSED_METRIC)] == [0.0]
  assert store.champion("ds-ml-100k", "sasrec", "ndcg", 10).run_id == "r1"
  # A later candidate is gated against the best blessed run, not the latest run.
  evaluated(backend, "r3", 0.095)
  assert gate(backend, "r3")["champion_run_id"] == "r1"


def test_tolerance_is_a_relative_noise_band(backend):
  evaluated(backend, "champ", 0.20)
  gate(backend, "champ")
  # 10% relative: [0.18, 0.22] ties. (An absolute 0.1 would have tied 0.15 and 0.25.)
  for run_id, value, expected in [("within-low", 0.181, "tie"), ("within-high", 0.219, "tie"),
                                  ("beyond", 0.179, "rejected"), ("far", 0.15, "rejected"),
                                  ("high", 0.25, "blessed")]:
    evaluated(backend, run_id, value)
    decision = gate(backend, run_id, tolerance=0.1)
    assert decision["decision"] == expected, (run_id, decision)
    assert decision["threshold"] == pytest.approx(0.22)
    assert decision["reject_threshold"] == pytest.approx(0.18)
  # The champion is the best blessed value, so tolerance cannot ratchet down.
  assert backend.open().champion("ds-ml-100k", "sasrec", "ndcg", 10).run_id == "high"


def test_revalidating_a_run_replaces_its_decision(backend):
  evaluated(backend, "r1", 0.10)
  gate(backend, "r1")
  evaluated(backend, "r2", 0.09)
  assert gate(backend, "r2")["blessed"] is False
  # Not its own champion: r1 stays the reference, r2's decision row is replaced.
  assert gate(backend, "r2", tolerance=0.2)["decision"] == "tie"
  rows = backend.open().rows("r2", metric=metrics_store.BLESSED_METRIC)
  assert [r.value for r in rows] == [0.5]


def test_gate_on_mrr_and_families_are_separate(backend):
  evaluated(backend, "s1", 0.1, mrr=0.05)
  evaluated(backend, "b1", 0.1, mrr=0.01, model="bert4rec")
  assert gate(backend, "s1", metric="mrr", k=None)["blessed"] is True
  first_bert = gate(backend, "b1", metric="mrr", k=None, model_family="bert4rec")
  assert first_bert["blessed"] is True and first_bert["champion_run_id"] is None
  evaluated(backend, "s2", 0.1, mrr=0.04)
  decision = gate(backend, "s2", metric="mrr", k=None)
  assert decision["blessed"] is False and decision["metric"] == "valid/mrr"


def test_candidate_value_given_and_lower_is_better(backend):
  kwargs = dict(metric="loss", k=None, higher_is_better=False, dataset_id="ds-x")
  assert gate(backend, "l1", candidate_value=2.0, **kwargs)["blessed"] is True
  worse = gate(backend, "l2", candidate_value=2.5, **kwargs)
  assert worse["decision"] == "rejected" and "2.5 > 2" in worse["reason"]
  better = gate(backend, "l3", candidate_value=1.5, **kwargs)
  assert better["decision"] == "blessed" and "1.5 < 2" in better["reason"]
  with pytest.raises(ValueError, match="has no dataset identity"):
    gate(backend, "l4", candidate_value=1.0, metric="loss", k=None)


def test_bad_input(backend):
  with pytest.raises(ValueError, match="has no valid ndcg@10"):
    gate(backend, "never-evaluated")
  with pytest.raises(ValueError, match="diverged run is never blessed"):
    gate(backend, "r", candidate_value=math.nan)
  with pytest.raises(ValueError, match=r"relative and must lie in \[0, 1\)"):
    gate(backend, "r", candidate_value=0.1, tolerance=1.5)
  with pytest.raises(ValueError, match="metric='ndcg', k=10"):
    gate(backend, "r", metric="ndcg@10")
  assert backend.open().rows() == []


@pytest.mark.parametrize("candidate, champion, tolerance, higher, expected", [
    (0.5, None, 0.0, True, ("blessed", None, None)),
    (0.2, 0.2, 0.0, True, ("tie", 0.2, 0.2)),
    (0.2000001, 0.2, 0.0, True, ("blessed", 0.2, 0.2)),
    (0.19, 0.2, 0.0, True, ("rejected", 0.2, 0.2)),
    (0.19, 0.2, 0.06, True, ("tie", 0.212, 0.188)),
    (0.213, 0.2, 0.06, True, ("blessed", 0.212, 0.188)),
    (-1.1, -1.0, 0.1, True, ("tie", -0.9, -1.1)),   # relative to |champion|
    (1.1, 1.0, 0.1, False, ("tie", 0.9, 1.1)),
    (0.89, 1.0, 0.1, False, ("blessed", 0.9, 1.1)),
    (1.2, 1.0, 0.1, False, ("rejected", 0.9, 1.1)),
])
def test_decide(candidate, champion, tolerance, higher, expected):
  decision, bless_at, reject_at = validate.decide(candidate, champion, tolerance, higher)
  assert decision == expected[0]
  assert (bless_at, reject_at) == (pytest.approx(expected[1]), pytest.approx(expected[2]))


def ranked(backend, run_id, auc, logloss, dataset_id="ds-frappe"):
  """A ranking run's evaluation rows: AUC (higher is better), log loss (lower)."""
  write_metrics.run(backend.uri, run_id, "recml", "dcnv2", "frappe_x1",
                    {"valid": {"auc": auc, "logloss": logloss}},
                    model_uri=f"runs/{run_id}/model", store_options=backend.options,
                    dataset_id=dataset_id)


def test_ranking_gate_blesses_on_auc_and_logloss_guards(backend):
  kw = dict(dataset="frappe_x1", model_family="dcnv2", metric="auc", k=None,
            tolerance=0.001, guard_metric="logloss")
  ranked(backend, "c1", 0.9800, 0.1600)
  assert gate(backend, "c1", **kw)["decision"] == "blessed"
  # Better AUC and log loss within 0.1% of the champion's: blessed.
  ranked(backend, "c2", 0.9840, 0.1601)
  ok = gate(backend, "c2", **kw)
  assert ok["decision"] == "blessed" and ok["guard"]["decision"] == "tie"
  assert ok["guard"]["champion_value"] == 0.1600
  # Better AUC but log loss 0.1700 > 0.1601 * 1.001: the guard vetoes the blessing.
  ranked(backend, "c3", 0.9850, 0.1700)
  vetoed = gate(backend, "c3", **kw)
  assert vetoed["decision"] == "rejected" and vetoed["blessed"] is False
  assert vetoed["guard"] == {"metric": "valid/logloss", "candidate_value": 0.17,
                             "champion_value": 0.1601, "decision": "rejected",
                             "reason": "guard valid logloss 0.17 > 0.16026 (champion 0.1601)"}
  assert backend.open().champion("ds-frappe", "dcnv2", "auc", None).run_id == "c2"
  # Lower is better is inferred from the name: a log-loss gate's champion is the blessed
  # run with the lowest log loss (c1: 0.16), and a lower value beats it.
  ranked(backend, "c4", 0.9700, 0.1500)
  by_loss = gate(backend, "c4", dataset="frappe_x1", model_family="dcnv2",
                 metric="logloss", k=None)
  assert by_loss["decision"] == "blessed"
  assert (by_loss["champion_run_id"], by_loss["champion_value"]) == ("c1", 0.16)
  ranked(backend, "c5", 0.9700, 0.1400)
  assert gate(backend, "c5", dataset="frappe_x1", model_family="dcnv2",
              metric="logloss", k=None)["decision"] == "blessed"
  ranked(backend, "c6", 0.9700, 0.1450)
  assert gate(backend, "c6", dataset="frappe_x1", model_family="dcnv2",
              metric="logloss", k=None)["decision"] == "rejected"
