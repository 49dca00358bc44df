"""Export step: a trained model in, a serving bundle out (see :mod:`trainers.export`).

``run`` is plain Python (tested directly); ``export`` is the thin KFP component that runs
it in the trainer image (it needs the model code to trace the model). The train step's
Model artifact holds no item vocabulary, so the step also takes the Dataset artifact
(``vocab/items.txt``).
"""


from typing import Any

from kfp.dsl import Dataset, Input, Model, Output

from components import kfp_step


def run(model_dir: str, bundle_dir: str, data_dir: str | None = None,
        max_k: int = 100) -> dict[str, Any]:
  """Writes the serving bundle of ``model_dir``'s selected checkpoint into ``bundle_dir``.

  Args:
    model_dir: the training work directory (train step's Model artifact).
    bundle_dir: the bundle directory (created).
    data_dir: the dataset directory with ``vocab/items.txt`` (default: the config's).
    max_k: the largest ``k`` requests may ask for.

  Returns:
    The bundle's ``bundle.json`` content.
  """
  from trainers import export  # pylint: disable=g-import-not-at-top
  return export.export_bundle(model_dir, bundle_dir, data_dir=data_dir, max_k=max_k)


def bundle_metadata(record: dict[str, Any]) -> dict[str, Any]:
  """Artifact metadata of the bundle (shown in the KFP / Vertex UIs)."""
  keys = ("model", "max_len", "max_k", "item_vocab_size", "item_id_type", "format",
          "format_version", "task")
  meta = {k: record[k] for k in keys if k in record}  # ranking: no item vocabulary
  meta["platforms"] = ",".join(record["platforms"])
  meta["framework"] = "jax.export (StableHLO)"
  for name, value in record["source"].get("valid", {}).items():
    if isinstance(value, (int, float)):
      meta[f"valid/{name}"] = float(value)
  return meta


@kfp_step.step("trainer")
def export(model: Input[Model], dataset: Input[Dataset], bundle: Output[Model],
           max_k: int = 100) -> str:
  """Exports the blessed model as a serving bundle.

  Args:
    model: the training work directory.
    dataset: the dataset (sequence: the item vocabulary; ranking: its features and
      vocabularies, copied into the bundle).
    bundle: the serving bundle (jax.export StableHLO, weights, vocabulary, config).
    max_k: the largest ``k`` a request may ask for.

  Returns:
    The bundle's URI (``gs://...`` on Vertex), for the Vertex model upload.
  """
  from components import export as step  # pylint: disable=g-import-not-at-top
  record = step.run(model.path, bundle.path, dataset.path, max_k)
  bundle.metadata.update(step.bundle_metadata(record))
  return bundle.uri
