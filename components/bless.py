"""Blessing record: the gate passed, so this model may be exported and served.

Runs only inside the pipeline's ``dsl.If(decision == "blessed")`` branch. It writes no
model: its artifact is a small JSON record (which model, which run, the gate's numbers)
whose lineage links the validate step to the model it blessed. The export and deploy
steps (the serving issue) consume the model next to it.
"""


import datetime
import json
import os
from typing import Any

from kfp.dsl import Artifact, Input, Markdown, Model, Output

from components import kfp_step

BLESSING_FILE = "blessing.json"


def run(out_dir: str, model_uri: str, run_id: str,
        gate: dict[str, Any] | None = None) -> dict[str, Any]:
  """Writes ``blessing.json`` into ``out_dir`` and returns its content.

  Args:
    out_dir: the blessing artifact's directory.
    model_uri: the blessed model's URI.
    run_id: the run that trained it.
    gate: the validate step's numbers (its verdict's metadata).
  """
  record = {
      "blessed": True,
      "model_uri": model_uri,
      "run_id": run_id,
      "gate": dict(gate or {}),
      "blessed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
  }
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, BLESSING_FILE), "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2)
  return record


@kfp_step.step("tools")
def bless(model: Input[Model], verdict: Input[Markdown], blessing: Output[Artifact],
          run_id: str = "", job_name: str = ""):
  """Records that ``model`` passed the gate.

  Args:
    model: the trained model.
    blessing: ``blessing.json`` (model URI, run id, gate numbers).
    run_id: the run id (empty: the pipeline job name).
    job_name: the pipeline job name, used when ``run_id`` is empty.
    verdict: the validate step's verdict (the gate's numbers are its metadata).
  """
  from components import bless as step  # pylint: disable=g-import-not-at-top
  record = step.run(blessing.path, model.uri, run_id or job_name, dict(verdict.metadata))
  blessing.metadata.update({"blessed": True, "model_uri": model.uri,
                            "run_id": record["run_id"]})
  blessing.metadata.update({f"gate/{k}": v for k, v in record["gate"].items()
                            if isinstance(v, (str, int, float, bool))})
