"""Experiment configs, --set overrides and the environment source."""

import pytest

from pipelines import config as config_lib
from trainers import configs, models
from pipelines import env as env_lib


def test_every_config_loads_and_says_how_to_run_it():
  names = config_lib.list_configs()
  assert {"ml1m_sasrec", "ml1m_hstu", "ml100k_smoke"} <= set(names)
  for name in names:
    text = open(config_lib.config_path(name), encoding="utf-8").read()
    assert "Run:" in text and "Reach:" in text, name
    config = config_lib.load_config(name)
    assert config["train"]["model"] in models.MODELS
    # Its train settings are valid for its model (the preset plus the file's values).
    configs.apply_overrides(configs.get_config(config["train"]["model"]), [
        f"{k}={v}" for k, v in config["train"].items() if k != "model"])


def test_set_overrides_are_typed_and_nested():
  config = config_lib.load_config("ml100k_smoke", [
      "train.epochs=1", "train.learning_rate=1e-6", "gate.tolerance=0.05",
      "labels.owner=me", "preprocess.max_len=20"])
  assert config["train"]["epochs"] == 1
  assert config["train"]["learning_rate"] == 1e-6
  params = config_lib.pipeline_parameters(config, data_uri="/d", store_uri="duckdb:///m")
  assert params["gate_tolerance"] == 0.05
  assert params["labels"] == {"purpose": "smoke", "owner": "me"}
  assert "epochs=1" in params["train_overrides"]
  assert params["max_len"] == 20 and "max_len=20" in params["train_overrides"]


def test_typos_are_rejected():
  with pytest.raises(ValueError, match="gate.metrc"):
    config_lib.load_config("ml100k_smoke", ["gate.metrc=hr"])
  with pytest.raises(ValueError, match="key=value"):
    config_lib.load_config("ml100k_smoke", ["train.epochs"])
  with pytest.raises(FileNotFoundError, match="known"):
    config_lib.load_config("nope")


def test_env_file_beats_process_environment(tmp_path):
  path = tmp_path / "env.sh"
  path.write_text("# deployment\nexport RECML_PROJECT=from-file\n"
                  "RECML_PIPELINE_ROOT='gs://bucket/root'  # comment\n")
  env = env_lib.load_env(str(path), environ={"RECML_PROJECT": "from-env",
                                             "RECML_REGION": "asia-east1"})
  assert env.project == "from-file"
  assert env.region == "asia-east1"
  assert env.pipeline_root == "gs://bucket/root"
  assert env.with_overrides(project="flag", region=None).project == "flag"
  (tmp_path / "bad.sh").write_text("not a setting\n")
  with pytest.raises(ValueError, match="KEY=VALUE"):
    env_lib.load_env(str(tmp_path / "bad.sh"), environ={})
