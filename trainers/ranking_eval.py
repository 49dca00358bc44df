"""A ranking (CTR) work directory's selected checkpoint: metrics, ROC curve, confusion matrix.

The numbers are the trainer's own: the selected (``best``) checkpoint is restored, its
logits on a split merged into the exact state of :func:`trainers.tasks.binary_state`,
and :func:`trainers.metrics.binary_compute` turns that state into AUC, log loss,
accuracy, NE and calibration, as at training time. The ROC curve and the confusion
matrix come from the same state (numpy), so they agree with those metrics: the
trapezoid area under the full curve is the exact (tie-aware) AUC, and the matrix at
the 0.5 threshold holds the accuracy's counts.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np

from trainers import configs, features, metrics, models, tasks
from trainers.checkpoints import load_config_dict, restore_selected
from trainers.input_pipeline import RankingData

CLASSES = ("no click", "click")  # the confusion matrix's categories, label 0 then 1


def load_selected(workdir: str, data_dir: str | None = None):
  """``(config, task, model, variables)`` of a ranking work directory's selected checkpoint.

  Args:
    workdir: a ``recml train`` work directory of a ranking model.
    data_dir: the ranking dataset (default: the one its ``config.json`` names).

  Raises:
    ValueError: not a ranking model, or a dataset whose feature tables differ from
      the ones the model was trained with.
  """
  saved = configs.TrainConfig.from_dict(load_config_dict(workdir))
  if saved.task != "ranking":
    raise ValueError(f"{workdir} holds a {saved.task} model ({saved.model}), not a ranking one")
  task = tasks.Ranking(saved.replace(data_dir=data_dir or saved.data_dir))
  config = task.prepare()
  differ = configs.config_differences(saved, config.replace(data_dir=saved.data_dir))
  if differ:
    raise ValueError(f"{config.data_dir} does not match the model in {workdir}: "
                     + ", ".join(f"{k} {a} (model) vs {b} (data)" for k, (a, b) in differ.items()))
  model = models.build(config.model, config.model_config)
  variables, _ = restore_selected(workdir, lambda: task.init(model, jax.random.key(0)))
  return config, task, model, variables


def split_states(workdir: str, data_dir: str | None = None,
                 splits: Sequence[str] = (features.VALID, features.TEST)
                 ) -> dict[str, dict[str, np.ndarray]]:
  """``{split: merged exact state}`` (logits, labels, weights) of the selected checkpoint."""
  config, task, model, variables = load_selected(workdir, data_dir)
  logits = task.make_logits(model)
  return {split: tasks.binary_state(
      logits, variables, RankingData(config.data_dir, split, config.eval_batch_size))
          for split in splits}


def _class_weights(state: Mapping[str, np.ndarray]):
  """``(logits, positive weight, negative weight)`` per row, float64."""
  if "logits" not in state:
    raise ValueError(f"expected a state of logits, got keys {sorted(state)}")
  labels = np.asarray(state["labels"], np.float64)
  weights = np.asarray(state["weights"], np.float64)
  return np.asarray(state["logits"], np.float64), weights * labels, weights * (1.0 - labels)


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|


def roc_curve(state: Mapping[str, np.ndarray], max_points: int = 200) -> dict[str, list[float]]:
  """The ROC curve of a state: ``{"fpr", "tpr", "threshold"}``, from (0, 0) to (1, 1).

  A point's threshold is a probability: rows with ``p >= threshold`` are predicted
  clicks. The full curve has a point per distinct probability (tied ones move both
  rates at once, so the trapezoid area is the exact AUC with ties counted half: that
  of the logits, :func:`trainers.metrics.weighted_auc`, unless float64 probabilities
  saturate, at |logit| > ~36); it is thinned to at most ``max_points`` points spread
  evenly along ``(fpr + tpr) / 2``, ends kept, so both rates stay non-decreasing and
  the thresholds decreasing. The first point's threshold lies just above the highest
  probability.

  Raises:
    ValueError: a class without weight (no ROC curve), or ``max_points`` < 2.
  """
  if max_points < 2:
    raise ValueError(f"max_points must be >= 2, got {max_points}")
  scores, pos, neg = _class_weights(state)
  keep = (pos > 0) | (neg > 0)
  scores, pos, neg = scores[keep], pos[keep], neg[keep]
  total_pos, total_neg = pos.sum(), neg.sum()
  if total_pos == 0 or total_neg == 0:
    raise ValueError(f"no ROC curve: {total_pos:g} positive and {total_neg:g} negative "
                     "examples (both classes are needed)")
  order = np.argsort(-scores, kind="stable")
  probs, pos, neg = _sigmoid(scores[order]), pos[order], neg[order]
  starts = np.flatnonzero(np.r_[True, probs[1:] != probs[:-1]])
  tpr = np.r_[0.0, np.cumsum(np.add.reduceat(pos, starts)) / total_pos]
  fpr = np.r_[0.0, np.cumsum(np.add.reduceat(neg, starts)) / total_neg]
  threshold = np.r_[np.nextafter(probs[0], np.inf), probs[starts]]
  tpr[-1] = fpr[-1] = 1.0  # exactly, not a float sum's 0.9999999999999998
  if len(tpr) > max_points:
    walk = (fpr + tpr) / 2.0
    picks = np.searchsorted(walk, np.linspace(0.0, 1.0, max_points), side="left")
    picks = np.unique(np.clip(np.r_[0, picks, len(walk) - 1], 0, len(walk) - 1))
    fpr, tpr, threshold = fpr[picks], tpr[picks], threshold[picks]
  return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "threshold": threshold.tolist()}


def confusion_matrix(state: Mapping[str, np.ndarray]) -> list[list[float]]:
  """``[[true negatives, false positives], [false negatives, true positives]]`` at 0.5.

  Rows are the labels (no click, click), columns the predictions; a row is predicted a
  click when ``p >= 0.5`` (logit >= 0), as for :func:`trainers.metrics.binary_compute`'s
  accuracy. Entries are summed weights: integers for unweighted examples.
  """
  scores, pos, neg = _class_weights(state)
  clicked = scores >= 0
  cells = [[neg[~clicked].sum(), neg[clicked].sum()], [pos[~clicked].sum(), pos[clicked].sum()]]
  return [[int(v) if float(v).is_integer() else float(v) for v in row] for row in cells]


def evaluate(workdir: str, data_dir: str | None = None, split: str = features.TEST,
             max_points: int = 200) -> dict[str, Any]:
  """The selected checkpoint on ``valid`` and ``split``: metrics, ROC, confusion matrix.

  Returns:
    ``{"metrics": {split: {auc, logloss, accuracy, ne, calibration, label_rate, count}},
    "facts": {"<split>/examples": n}, "roc": roc_curve(...), "confusion_matrix": [[..]],
    "split": split}``; ``roc`` and ``confusion_matrix`` are those of ``split``.
  """
  splits = tuple(dict.fromkeys((features.VALID, split)))
  states = split_states(workdir, data_dir, splits)
  values = {s: metrics.binary_compute(state) for s, state in states.items()}
  return {"metrics": values,
          "facts": {f"{s}/examples": int(round(v["count"])) for s, v in values.items()},
          "roc": roc_curve(states[split], max_points),
          "confusion_matrix": confusion_matrix(states[split]), "split": split}
