"""Train step: a sequence dataset in, a model directory (Orbax checkpoints + config) out.

``run`` is plain Python (tested directly); ``train`` is the thin KFP component that
runs it inside the trainer image. On Vertex AI the same component is wrapped into a
CustomJob on TPU by :mod:`pipelines.dag`.

The Model artifact directory is the trainer's work directory::

    checkpoints/{best,latest}/   Orbax
    config.json                  the exact TrainConfig
    dataset_info.json            copied from the dataset (vocabulary sizes, max_len)
    metrics.json log.jsonl tb/   metrics at the selected epoch, per-epoch log, TensorBoard
"""


import json
import os
import shutil
from typing import Any, Sequence

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import kfp_step

# Metrics copied into artifact metadata (and so shown in the KFP/Vertex UIs); those of
# the model's task are present (retrieval: hr/ndcg/mrr; ranking: auc, logloss).
HEADLINE = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "mrr", "auc", "logloss")


def run(data_dir: str, workdir: str, model: str = "sasrec",
        overrides: Sequence[str] = ()) -> dict[str, Any]:
  """Trains one model on a sequence dataset.

  Args:
    data_dir: a dataset directory written by ``recml preprocess``.
    workdir: where checkpoints, config, logs and metrics go (created).
    model: a model config name of ``trainers.configs`` (``sasrec``, ``hstu``, ...).
    overrides: ``key=value`` strings applied to the config (``epochs=2``).

  Returns:
    ``{"metrics": <metrics.json>, "config": <config dict>, "dataset_info": <dict>}``.
  """
  from trainers import configs, features, train as trainer  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  config = configs.get_config(model, data_dir=data_dir)
  config = configs.apply_overrides(config, list(overrides))
  metrics = trainer.train_and_evaluate(config, workdir)
  info_src = os.path.join(data_dir, features.DATASET_INFO_FILE)
  from trainers import distributed  # pylint: disable=g-import-not-at-top
  if distributed.is_primary():  # a multi-host job's other processes write nothing
    shutil.copyfile(info_src, os.path.join(workdir, features.DATASET_INFO_FILE))
  with open(info_src, encoding="utf-8") as f:
    info = json.load(f)
  return {"metrics": metrics, "config": config.to_dict(), "dataset_info": info}


def model_metadata(result: dict[str, Any]) -> dict[str, Any]:
  """Artifact metadata for the Model: hyper-parameters, data and headline metrics."""
  metrics, config, info = result["metrics"], result["config"], result["dataset_info"]
  meta = {
      "framework": "jax/flax",
      "model": metrics.get("model", config.get("model", "")),
      "dataset": metrics.get("dataset", ""),
      "item_vocab_size": info.get("item_vocab_size"),
      "num_users": info.get("num_users"),
      "selected_epoch": metrics.get("selected_epoch"),
      "epochs_run": metrics.get("epochs_run"),
      "seconds_per_epoch": metrics.get("seconds_per_epoch"),
      "checkpoint": "checkpoints/best",
      "hyperparameters": {
          **{k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))},
          **{f"model.{k}": v for k, v in config.get("model_config", {}).items()
             if isinstance(v, (int, float, str, bool))}},
  }
  if metrics.get("task") == "ranking":  # no items or users: rows of features
    del meta["item_vocab_size"], meta["num_users"]
    meta.update(task="ranking", examples_per_second=metrics.get("examples_per_second"),
                label_rate=dict(info.get("label_rate") or {}))
  for split in ("valid", "test"):
    for name in HEADLINE:
      value = metrics.get(split, {}).get(name)
      if value is not None:
        meta[f"{split}/{name}"] = float(value)
  return meta


@kfp_step.step("trainer")
def train(
    dataset: Input[Dataset],
    model: Output[Model],
    training_metrics: Output[Metrics],
    model_name: str = "sasrec",
    overrides: list = [],  # pylint: disable=dangerous-default-value
    dataset_name: str = "",
):
  """Trains a model on the dataset; the Model artifact is the work directory.

  Args:
    dataset: the sequence dataset (output of preprocess).
    model: the work directory: checkpoints, config.json, dataset_info.json, logs.
    training_metrics: validation/test metrics at the selected epoch.
    model_name: model config name (sasrec, hstu, hstu-large).
    overrides: ``key=value`` TrainConfig overrides.
    dataset_name: the dataset's name, for the metadata.
  """
  import json  # pylint: disable=g-import-not-at-top,redefined-outer-name,reimported
  from components import train as step  # pylint: disable=g-import-not-at-top

  result = step.run(dataset.path, model.path, model_name, overrides)
  meta = step.model_metadata(result)
  if dataset_name:
    meta["dataset"] = dataset_name
  model.metadata.update(meta)
  for key, value in meta.items():
    if "/" in key:
      training_metrics.log_metric(key, value)
  training_metrics.log_metric("selected_epoch", result["metrics"].get("selected_epoch") or 0)
  with open(training_metrics.path, "w", encoding="utf-8") as f:
    json.dump(result["metrics"], f, indent=2)
