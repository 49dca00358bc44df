"""``recml train``: train and evaluate one model on a sequence dataset.

Example::

    recml train --data /tmp/ml1m --model hstu --workdir runs/hstu --epochs 40
    recml train --data /tmp/ml1m --model sasrec --workdir runs/s --set num_negatives=256
    recml train --data /tmp/ml1m --model mamba4rec --workdir runs/m   # full-softmax CE preset

Re-running the same command resumes from ``--workdir``; so does raising ``--epochs``.
Any other change (model, data, ``--set``) is refused for a work directory that holds
checkpoints: train it in a new ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


# The registry's names (trainers.models.MODELS, checked by a test), listed here so that
# building the CLI parser imports no JAX/Flax: slim images (preprocess, tools) have none.
MODELS = ("sasrec", "bert4rec", "mamba4rec", "hstu", "hstu-large", "dlrm-v2", "dcnv2", "dlrm")


def register(subparsers) -> None:
  p = subparsers.add_parser(
      "train", help="train and evaluate a model on a sequence dataset",
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", required=True, help="dataset directory written by `recml preprocess`")
  p.add_argument("--model", default="sasrec", choices=MODELS)
  p.add_argument("--workdir", required=True, help="checkpoints, logs and metrics.json go here")
  p.add_argument("--epochs", type=int, help="number of epochs (default: the preset's)")
  p.add_argument("--smoke", action="store_true", help="tiny model and 2 epochs (for checks)")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config field, e.g. --set batch_size=256 --set num_blocks=4")
  cache = p.add_mutually_exclusive_group()
  cache.add_argument("--compile-cache", metavar="DIR",
                     help="JAX's persistent compilation cache: a resumed or repeated run reads "
                     "its compiled steps instead of compiling them again (default: "
                     "$XDG_CACHE_HOME/recml/compile/train, else ~/.cache/recml/compile/train; "
                     "JAX runs what it finds there: only you should write to it)")
  cache.add_argument("--no-compile-cache", action="store_true",
                     help="compile every step at each start, with no cache on disk")
  p.set_defaults(func=_main)


def _use_compile_cache(args: argparse.Namespace) -> None:
  """Turns the compile cache on (before JAX starts); a folder that cannot be made: a
  warning, no cache."""
  from trainers import compile_cache  # pylint: disable=g-import-not-at-top  (no JAX)
  directory = None if args.no_compile_cache else (
      args.compile_cache or os.path.join(compile_cache.default_root(), "train"))
  directory = compile_cache.turn_on(directory, "recml train", "step")
  if directory is not None:
    logging.getLogger("recml.train").info("compile cache: %s (%d executables)", directory,
                                          compile_cache.entries(directory))


def _main(args: argparse.Namespace) -> int:
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  _use_compile_cache(args)
  from trainers import distributed  # pylint: disable=g-import-not-at-top
  try:  # before anything touches a JAX backend: join the job's other processes, if any
    distributed.initialize()
  except ValueError as e:
    print(f"recml train: {e}", file=sys.stderr)
    return 2
  from trainers import configs, train  # pylint: disable=g-import-not-at-top
  from trainers.checkpoints import WorkdirConflict  # pylint: disable=g-import-not-at-top
  try:
    config = configs.get_config(args.model, smoke=args.smoke, data_dir=args.data)
    if args.epochs is not None:
      config = config.replace(epochs=args.epochs)
    config = configs.apply_overrides(config, args.overrides)
  except ValueError as e:
    print(f"recml train: {e}", file=sys.stderr)
    return 2
  try:
    summary = train.train_and_evaluate(config, args.workdir)
  except WorkdirConflict as e:
    print(f"recml train: {e}", file=sys.stderr)
    return 2
  if not distributed.is_primary():  # process 0 reports for the job
    return 0
  print(json.dumps({k: summary[k] for k in ("model", "dataset", "selected_epoch", "valid",
                                            "test", "seconds_per_epoch")}, indent=2))
  print(f"metrics: {args.workdir}/metrics.json")
  return 0
