"""Peer comparison: RecBole's SASRec and BERT4Rec on this project's ml-1m-partial split.

Issue 12 asks for our sequential models side by side with a peer library on this
machine. This script runs RecBole (https://recbole.io), installed into its own venv
(``--venv``, default ``.venv-recbole``; never the project's ``.venv``), on the same data
and protocol as our SASRec / BERT4Rec:

* data: ``../shared/datasets/ml-1m-partial`` (users 1-2999 of MovieLens-1M, every rating
  an implicit interaction), converted to a RecBole atomic ``.inter`` file
  (``user_id:token item_id:token rating:float timestamp:float``);
* split: leave-one-out by time (``eval_args: split {'LS': 'valid_and_test'}, order TO``):
  each user's last item is test, the one before it validation, the rest training;
* loss: full-softmax cross-entropy (``loss_type CE``, ``train_neg_sample_args None``);
  ``MAX_ITEM_LIST_LENGTH`` 200, ``train_batch_size`` 128, Adam lr 1e-3, seed 2020;
* evaluation: full ranking over all items, the user's history excluded; Hit@10, NDCG@10,
  Hit@50, NDCG@50 and MRR (untruncated: RecBole's MRR@K with K = the number of items;
  its MRR@10 is reported too);
* everything else: the model's RecBole defaults (recorded in the JSON under
  ``hyper_parameters``): SASRec 2 layers, 2 heads, hidden 64, inner 256, dropout 0.5/0.5,
  GELU; BERT4Rec 2 layers, 2 heads, hidden 64, inner 256, dropout 0.2/0.2, mask ratio 0.2.

RecBole trains on every prefix of every sequence as a separate example (about 3,740
batches of 128 per epoch here, against 24 for our models), so a full epoch takes ~34 min
(SASRec) / ~56 min (BERT4Rec) on this 2-core machine. ``--batches N`` trains on the first
N batches of the first epoch only and scales the training time up to a full epoch
(``projected_epoch_seconds``, linear); ``--batches 0`` runs one full epoch. Either way the
model is then evaluated on validation and test.

Each model runs in a fresh process of the venv's python (a runner script written into
the work folder), with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` and torch's threads set to
the number of cores. Results: ``<workdir>/results/<model>.json`` per model and a Markdown
table on stdout (also ``<workdir>/results/summary.md``).

    .venv/bin/python benchmarks/recbole_peer.py --models SASRec BERT4Rec --batches 300
    .venv/bin/python benchmarks/recbole_peer.py --models SASRec --batches 0   # a full epoch

From another script in benchmarks/ (its folder is on sys.path)::

    import recbole_peer
    result = recbole_peer.run("SASRec", batches=300, workdir="workdirs/recbole")
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET_DIR = os.path.join(os.path.dirname(ROOT), "shared", "datasets", "ml-1m-partial")
DATASET_NAME = "ml-1m-partial"
DEFAULT_VENV = os.path.join(ROOT, ".venv-recbole")
DEFAULT_WORKDIR = os.path.join(ROOT, "workdirs", "recbole")
MODELS = ("SASRec", "BERT4Rec")

# RecBole 1.2.1 (its last release) predates numpy 2 and pandas 3 (under pandas 3's
# copy-on-write its in-place fillna calls silently do nothing) and uses pkg_resources (gone
# in setuptools 81). torch 2.13.0 is the CPU build that the project's other peer benchmark
# (ranking_speed.py) pins as well; PyPI's plain torch wheel is the multi-GB CUDA build.
RECBOLE_PINS = ("recbole==1.2.1", "numpy<2", "pandas<3", "setuptools<81")
TORCH_PIN = "torch==2.13.0"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
_READY: dict[str, str] = {}  # venvs checked by this process


def _log(msg: str) -> None:
  print(f"[recbole] {msg}", flush=True)


def _base_python(python: str | None) -> str:
  """The interpreter to build the venv from: `python`, else a Python 3.11."""
  if python:
    return python
  if sys.version_info[:2] == (3, 11):
    return sys.executable
  for cand in (shutil.which("python3.11"), "/usr/bin/python3.11"):
    if cand and os.path.exists(cand):
      return cand
  raise RuntimeError("no Python 3.11 found to build the RecBole venv from; pass --python")


def _venv_ok(python: str) -> bool:
  if not os.path.exists(python):
    return False
  check = subprocess.run([python, "-c", "import recbole, torch"], capture_output=True,
                         text=True, env=_clean_env())
  return check.returncode == 0


def _clean_env(threads: int | None = None) -> dict[str, str]:
  """The environment for the venv's processes: none of the project's venv settings."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
  env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"  # RecBole reloads checkpoints with torch.load
  env["PYTHONUNBUFFERED"] = "1"
  if threads:
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
  return env


def _pip(python: str, args: list[str], what: str, log_path: str) -> None:
  """Runs `pip install args`, echoing each package it collects; raises with pip's tail."""
  cmd = [python, "-m", "pip", "install", "--disable-pip-version-check",
         "--progress-bar", "off"] + args
  tail: list[str] = []
  with open(log_path, "a", encoding="utf-8") as log:
    log.write(f"$ {' '.join(cmd)}\n")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_clean_env())
    assert proc.stdout is not None
    for line in proc.stdout:
      log.write(line)
      tail = (tail + [line.rstrip()])[-30:]
      if line.startswith(("Collecting", "Successfully installed")):
        _log(f"  {line.strip()[:150]}")
    rc = proc.wait()
  if rc:
    raise RuntimeError(f"pip failed installing {what} (exit {rc}; full log {log_path}); "
                       "its last lines:\n" + "\n".join(tail))


def ensure_venv(venv: str = DEFAULT_VENV, python: str | None = None) -> str:
  """Creates the RecBole venv unless it imports recbole with these pins; returns its python.

  An existing venv with other pins is brought up to these (pip is a no-op for whatever
  already satisfies them).

  Args:
    venv: the venv's folder.
    python: the interpreter to build it from (default: a Python 3.11).

  Returns:
    The path of the venv's python.

  Raises:
    RuntimeError: the venv cannot be created, pip fails (naming the package and showing
      pip's last lines), or the result does not import recbole.
  """
  vpython = os.path.join(venv, "bin", "python")
  if _READY.get(venv) == vpython:
    return vpython
  marker = os.path.join(venv, "recml-pins.txt")
  wanted = "\n".join((TORCH_PIN,) + RECBOLE_PINS) + "\n"
  if _venv_ok(vpython) and os.path.exists(marker):
    with open(marker, encoding="utf-8") as f:
      if f.read() == wanted:
        _READY[venv] = vpython
        return vpython
  t0 = time.perf_counter()
  if os.path.exists(vpython):  # an earlier install with other pins: bring it up to these
    _log(f"updating {venv} to the pins {' '.join(RECBOLE_PINS)} ...")
  else:
    base = _base_python(python)
    _log(f"creating venv {venv} from {base} (one-off; a few minutes) ...")
    made = subprocess.run([base, "-m", "venv", venv], capture_output=True, text=True)
    if made.returncode:
      raise RuntimeError(f"cannot create the venv {venv} with {base} -m venv:\n"
                         f"{made.stdout}{made.stderr}".rstrip())
  log_path = os.path.join(venv, "pip-install.log")
  # torch first, alone: the CPU wheel from PyTorch's index where reachable, else whatever
  # the configured indexes hold for the pin (a local CPU wheel on this machine).
  index: list[str] = []
  try:
    urllib.request.urlopen(TORCH_CPU_INDEX + "/torch/", timeout=10).close()
    index = ["--extra-index-url", TORCH_CPU_INDEX]
  except OSError:
    _log(f"  {TORCH_CPU_INDEX} unreachable: {TORCH_PIN} comes from the configured indexes")
  _log(f"pip install {TORCH_PIN} ...")
  _pip(vpython, index + [TORCH_PIN], TORCH_PIN, log_path)
  _log(f"pip install {' '.join(RECBOLE_PINS)} ...")
  _pip(vpython, [*RECBOLE_PINS, TORCH_PIN], " ".join(RECBOLE_PINS), log_path)
  check = subprocess.run([vpython, "-c", "import recbole, torch; print(recbole.__version__, "
                          "torch.__version__)"], capture_output=True, text=True,
                         env=_clean_env())
  if check.returncode:
    raise RuntimeError(f"the venv {venv} was installed but does not import recbole "
                       f"(pip log {log_path}):\n{check.stderr[-3000:]}")
  freeze = subprocess.run([vpython, "-m", "pip", "freeze"], capture_output=True, text=True)
  with open(marker, "w", encoding="utf-8") as f:
    f.write(wanted)
  with open(os.path.join(venv, "recml-freeze.txt"), "w", encoding="utf-8") as f:
    f.write(freeze.stdout)
  _READY[venv] = vpython
  _log(f"venv ready in {time.perf_counter() - t0:.0f} s: recbole, torch "
       f"{check.stdout.strip()}")
  return vpython


def convert(workdir: str = DEFAULT_WORKDIR, source: str = DATASET_DIR) -> str:
  """Writes ml-1m-partial as RecBole's atomic `.inter` file; returns RecBole's data_path.

  Rows keep the source file's order (RecBole sorts by time itself, stably).

  Args:
    workdir: the work folder; the file goes to `<workdir>/data/<name>/<name>.inter`.
    source: the folder with `ratings_users1-2999.dat.gz` (`UserID::MovieID::Rating::Time`).

  Returns:
    The `data_path` to give RecBole (the folder holding the dataset's folder).
  """
  src = os.path.join(source, "ratings_users1-2999.dat.gz")
  if not os.path.exists(src):
    raise FileNotFoundError(f"{src} not found (see ../shared/datasets/README.md)")
  data_path = os.path.join(workdir, "data")
  out_dir = os.path.join(data_path, DATASET_NAME)
  out = os.path.join(out_dir, f"{DATASET_NAME}.inter")
  stamp = f"{src} {os.path.getsize(src)} {int(os.path.getmtime(src))}\n"
  stamp_path = out + ".source"
  if os.path.exists(out) and os.path.exists(stamp_path):
    with open(stamp_path, encoding="utf-8") as f:
      if f.read() == stamp:
        return data_path
  os.makedirs(out_dir, exist_ok=True)
  rows = 0
  with gzip.open(src, "rt", encoding="latin-1") as fin, \
       open(out + ".tmp", "w", encoding="utf-8") as fout:
    fout.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
    for line in fin:
      if line.strip():
        user, item, rating, ts = line.strip().split("::")
        fout.write(f"{user}\t{item}\t{rating}\t{ts}\n")
        rows += 1
  os.replace(out + ".tmp", out)
  with open(stamp_path, "w", encoding="utf-8") as f:
    f.write(stamp)
  _log(f"wrote {out} ({rows:,} interactions)")
  return data_path


# The runner executed by the venv's python: argv[1] is a JSON of its arguments.
RUNNER = r'''
"""Trains one RecBole model for N batches (0 = one epoch), evaluates it; writes a JSON."""
import itertools, json, os, platform, resource, sys, time

import warnings
warnings.filterwarnings("ignore")  # RecBole's FutureWarnings from torch and pandas
args = json.loads(sys.argv[1])
sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value options from the command line
import torch
torch.set_num_threads(args["threads"])
import recbole
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.utils import get_model, get_trainer, init_seed

HYPER = ("n_layers", "n_heads", "hidden_size", "inner_size", "hidden_dropout_prob",
         "attn_dropout_prob", "hidden_act", "layer_norm_eps", "initializer_range",
         "mask_ratio", "ft_ratio", "loss_type", "learning_rate", "learner", "weight_decay",
         "MAX_ITEM_LIST_LENGTH", "train_batch_size", "eval_batch_size", "seed")

config_dict = {
    "data_path": args["data_path"],
    "checkpoint_dir": os.path.join(args["workdir"], "saved"),
    # The rating is not used (every rating is an interaction); loading it would add a
    # rating_list of 200 floats to each of the ~485k training prefixes.
    "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
    "MAX_ITEM_LIST_LENGTH": 200,
    "train_batch_size": 128,
    # Users per full-ranking evaluation batch (RecBole's default 4096 pushes the whole
    # set through the encoder at once: ~8 GB peak here); results do not depend on it.
    "eval_batch_size": 512,
    "loss_type": "CE",
    "train_neg_sample_args": None,
    "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full",
                  "group_by": "user"},
    "metrics": ["Hit", "NDCG", "MRR"],
    "topk": [10, 50],
    "valid_metric": "NDCG@10",
    "metric_decimal_place": 6,
    "epochs": 1,
    "use_gpu": False,
    "device": "cpu",
    "show_progress": False,
    "log_wandb": False,
    "worker": 0,
}
config = Config(model=args["model"], dataset=args["dataset"], config_dict=config_dict)
init_seed(config["seed"], config["reproducibility"])
t0 = time.perf_counter()
dataset = create_dataset(config)
train_data, valid_data, test_data = data_preparation(config, dataset)
prep_seconds = time.perf_counter() - t0
# MRR over the whole ranking (as this project reports it): RecBole's MRR@K, K = every item.
config["topk"] = [10, 50, dataset.item_num]
init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
n_params = sum(p.numel() for p in model.parameters())
full_batches = len(train_data)
limit = args["batches"] if 0 < args["batches"] < full_batches else full_batches
every = max(1, min(100, limit // 10))
print(f"{args['model']}: {dataset.user_num - 1} users, {dataset.item_num - 1} items, "
      f"{dataset.inter_num} training prefixes; {full_batches} batches of 128 per epoch; "
      f"training {limit}; {n_params:,} parameters; {torch.get_num_threads()} threads; "
      f"device {config['device']}", flush=True)
stats = {}


class Limited:
  """The train loader, cut to its first `limit` batches, timing them."""

  def __init__(self, data):
    self._data = data

  def __getattr__(self, name):
    return getattr(self._data, name)

  def __len__(self):
    return limit

  def __iter__(self):
    t0 = time.perf_counter()
    n = 0
    for batch in itertools.islice(iter(self._data), limit):
      yield batch
      n += 1
      if n == 1:
        stats["first_batch_seconds"] = time.perf_counter() - t0
      if n % every == 0 or n == limit:
        dt = time.perf_counter() - t0
        print(f"  batch {n}/{limit}: {dt:.1f} s, {dt / n:.3f} s/batch", flush=True)
    stats["batches"] = n


Base = get_trainer(config["MODEL_TYPE"], config["model"])


class CutTrainer(Base):
  def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
    return super()._train_epoch(Limited(train_data), epoch_idx, loss_func=loss_func,
                                show_progress=False)


trainer = CutTrainer(config, model)
load_before = os.getloadavg()[0]
t0, c0 = time.perf_counter(), time.process_time()
trainer.fit(train_data, valid_data=None, verbose=False, saved=False, show_progress=False)
train_seconds = time.perf_counter() - t0
train_cpu_seconds = time.process_time() - c0
load_after = os.getloadavg()[0]


def evaluate(data):
  t0 = time.perf_counter()
  res = trainer.evaluate(data, load_best_model=False, show_progress=False)
  seconds = time.perf_counter() - t0
  k = dataset.item_num
  out = {m: float(res[m]) for m in ("hit@10", "ndcg@10", "hit@50", "ndcg@50", "mrr@10")}
  out["mrr"] = float(res[f"mrr@{k}"])
  return out, seconds


valid, valid_seconds = evaluate(valid_data)
test, test_seconds = evaluate(test_data)
batches = stats.get("batches", 0)
result = {
    "library": "recbole", "recbole_version": recbole.__version__,
    "torch_version": torch.__version__, "python": platform.python_version(),
    "model": args["model"], "dataset": args["dataset"],
    "protocol": "leave-one-out by time, full ranking, history excluded; CE loss",
    "hyper_parameters": {h: config[h] for h in HYPER if config[h] is not None},
    "parameters": n_params, "threads": torch.get_num_threads(),
    "users": dataset.user_num - 1, "items": dataset.item_num - 1,
    "interactions": dataset.inter_num + dataset.user_num - 1,
    "prefix_examples": dataset.inter_num,
    "batches": batches, "batches_per_epoch": full_batches,
    "full_epoch": batches >= full_batches,
    "train_seconds": train_seconds,
    # CPU seconds of this process while training: well under threads x train_seconds
    # means the cores were shared with other work (see the load averages).
    "train_cpu_seconds": train_cpu_seconds,
    "load_average_1min": [load_before, load_after],
    "seconds_per_batch": train_seconds / max(batches, 1),
    "first_batch_seconds": stats.get("first_batch_seconds"),
    "projected_epoch_seconds": train_seconds * full_batches / max(batches, 1),
    "data_prep_seconds": prep_seconds,
    "valid_eval_seconds": valid_seconds, "test_eval_seconds": test_seconds,
    "eval_seconds": valid_seconds + test_seconds,
    "test": test, "valid": valid,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}
with open(args["out"], "w") as f:
  json.dump(result, f, indent=2)
print(f"{args['model']}: {batches} batches in {train_seconds:.1f} s "
      f"({result['seconds_per_batch']:.3f} s/batch; a full epoch ~"
      f"{result['projected_epoch_seconds']:.0f} s); eval {result['eval_seconds']:.1f} s; "
      f"test HR@10 {test['hit@10']:.4f} NDCG@10 {test['ndcg@10']:.4f}", flush=True)
'''


def _model_name(model: str) -> str:
  for m in MODELS:
    if m.lower() == model.lower():
      return m
  raise ValueError(f"unknown model {model!r}: one of {MODELS}")


def run(model: str, batches: int, workdir: str = DEFAULT_WORKDIR, venv: str = DEFAULT_VENV,
        threads: int | None = None, python: str | None = None) -> dict:
  """Trains and evaluates one RecBole model in the venv; returns its results.

  Args:
    model: "SASRec" or "BERT4Rec" (any case).
    batches: train on the first `batches` batches of the first epoch; 0 = a full epoch.
    workdir: the work folder (data, runner, checkpoints, results/<model>.json).
    venv: the RecBole venv (created when it does not import recbole).
    threads: torch threads (default: the number of cores).
    python: the interpreter to build the venv from (default: a Python 3.11).

  Returns:
    The dict written to `<workdir>/results/<model>.json`.

  Raises:
    RuntimeError: the install or the run failed (with the run's last output lines).
  """
  model = _model_name(model)
  workdir = os.path.abspath(workdir)
  vpython = ensure_venv(venv, python)
  data_path = convert(workdir)
  os.makedirs(os.path.join(workdir, "results"), exist_ok=True)
  runner = os.path.join(workdir, "recbole_runner.py")
  with open(runner, "w", encoding="utf-8") as f:
    f.write(RUNNER)
  out = os.path.join(workdir, "results", f"{model}.json")
  if os.path.exists(out):
    os.remove(out)
  threads = threads or os.cpu_count() or 1
  args = {"model": model, "dataset": DATASET_NAME, "data_path": data_path,
          "workdir": workdir, "batches": int(batches), "threads": threads, "out": out}
  _log(f"{model}: {'one full epoch' if batches <= 0 else f'{batches} batches'} ...")
  t0 = time.perf_counter()
  proc = subprocess.Popen([vpython, runner, json.dumps(args)], cwd=workdir,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=_clean_env(threads))
  assert proc.stdout is not None
  tail: list[str] = []
  for line in proc.stdout:
    tail = (tail + [line.rstrip()])[-40:]
    if not line.startswith(("Warning", "  warnings.warn")) and "Warning:" not in line:
      print(f"  [{model}] {line.rstrip()}", flush=True)
  rc = proc.wait()
  if rc or not os.path.exists(out):
    raise RuntimeError(f"RecBole {model} failed (exit {rc}); its last lines:\n"
                       + "\n".join(tail))
  with open(out, encoding="utf-8") as f:
    result = json.load(f)
  result["process_seconds"] = time.perf_counter() - t0
  with open(out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  return result


def table(results: list[dict]) -> str:
  """A Markdown table of run() results."""
  head = ("| model | batches | of epoch | train s | s/batch | epoch s (projected) | eval s "
          "| HR@10 | NDCG@10 | HR@50 | NDCG@50 | MRR | valid HR@10 | peak RSS MiB |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
  rows = []
  for r in results:
    t = r["test"]
    rows.append(
        f"| RecBole {r['model']} | {r['batches']} | {r['batches_per_epoch']} "
        f"| {r['train_seconds']:.1f} | {r['seconds_per_batch']:.3f} "
        f"| {r['projected_epoch_seconds']:.0f}{'' if r['full_epoch'] else ' (scaled)'} "
        f"| {r['eval_seconds']:.1f} | {t['hit@10']:.4f} | {t['ndcg@10']:.4f} "
        f"| {t['hit@50']:.4f} | {t['ndcg@50']:.4f} | {t['mrr']:.4f} "
        f"| {r['valid']['hit@10']:.4f} | {r['peak_rss_mib']:.0f} |")
  return head + "\n".join(rows) + "\n"


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", nargs="+", default=list(MODELS), help="SASRec, BERT4Rec")
  parser.add_argument("--batches", type=int, default=300,
                      help="training batches of the first epoch; 0 = one full epoch")
  parser.add_argument("--workdir", default=DEFAULT_WORKDIR)
  parser.add_argument("--venv", default=DEFAULT_VENV)
  parser.add_argument("--python", default=None, help="interpreter to build the venv from")
  parser.add_argument("--threads", type=int, default=None, help="default: the core count")
  args = parser.parse_args()
  models = [_model_name(m) for m in args.models]
  ensure_venv(args.venv, args.python)
  results = [run(m, args.batches, args.workdir, args.venv, args.threads, args.python)
             for m in models]
  md = table(results)
  with open(os.path.join(args.workdir, "results", "summary.md"), "w", encoding="utf-8") as f:
    f.write(md)
  print()
  print(md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
