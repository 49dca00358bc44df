"""The ``recml`` command line.

Each sub-command lives next to the code it drives and registers itself through a
``register(subparsers)`` function; this module only assembles them. Heavy imports
(JAX, TensorFlow, Beam, KFP) happen inside the commands, so ``recml --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that define sub-commands, in the order they appear in --help.
COMMAND_MODULES = (
    "pipelines.commands",          # run, compile, schedule, runs
    "components.preprocess.cli",   # preprocess
    "trainers.main",               # train
    "serving.cli",                 # serve, export
    "pipelines.deploy_cli",        # deploy
)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="recml",
      description="RecML Pipelines: train, evaluate, gate, export and serve recommenders.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
  for name in COMMAND_MODULES:
    try:
      module = importlib.import_module(name)
    except ModuleNotFoundError as e:
      if not e.name or not name.startswith(e.name):  # a missing dependency: surface it
        raise
      continue  # this install does not ship that part (e.g. a slim image)
    module.register(sub)
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    return int(args.func(args) or 0)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
