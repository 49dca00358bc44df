"""`recml --help` and every sub-command's parser build without the heavy frameworks, nor
any one extra's packages (the images install different extras)."""

import subprocess
import sys

from trainers import main as train_main
from trainers import models

BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"jax", "jaxlib", "flax", "optax", "orbax", "tensorflow",
                                  "apache_beam", "tensorflow_transform", "kfp", "duckdb",
                                  "aiohttp", "orjson", "uvloop"}:
            raise ImportError(f"blocked heavy import: {name}")
sys.meta_path.insert(0, Block())
from pipelines import cli
parser = cli.build_parser()
print(sorted(a.dest for a in parser._subparsers._group_actions[0]._choices_actions))
"""


def test_parser_builds_without_heavy_frameworks():
  out = subprocess.run([sys.executable, "-c", BLOCK], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  for command in ("run", "compile", "schedule", "runs", "preprocess", "train", "serve"):
    assert f"'{command}'" in out.stdout, (command, out.stdout)


def test_train_command_lists_the_registry():
  assert train_main.MODELS == models.MODELS
