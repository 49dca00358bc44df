"""Ranking train-step speed: this project's ``dlrm-v2`` (JAX) against TorchRec's ``DLRM_DCN``.

Both train the MLPerf DLRM-DCNv2 network on the same Criteo-shaped synthetic batches (13
dense, 26 categorical features, embedding dim 128, bottom MLP 512-256-128, three low-rank
(512) DCNv2 cross layers, top MLP 1024-1024-512-256-1, Adagrad lr 0.005 from zero
accumulators), single-process on this machine's CPU cores. Vocabularies are MLPerf's,
each capped at ``--vocab-cap`` rows (plus the PAD and OOV rows of this project's tables),
so that both fit in memory together.

* JAX: ``trainers.train.make_train_step`` with the ranking task's loss
  (:class:`trainers.tasks.Ranking`), jitted with the state donated, as training does.
* TorchRec: ``DLRM_DCN`` in ``DLRMTrain``, sharded by ``DistributedModelParallel`` (one
  gloo process) so that the tables are fused FBGEMM tables whose Adagrad update is
  applied in the backward pass to the looked-up rows only (``apply_optimizer_in_backward``
  with ``torch.optim.Adagrad``, FBGEMM's ``EXACT_ADAGRAD``: MLPerf's reference setup);
  dense parameters: ``torch.optim.Adagrad``. Installed by this script into its own venv
  (``--torchrec-venv``), never into the project's.

Two precisions, each side by side: float32, and bfloat16 compute with float32 parameters
and optimiser state (JAX: the model's ``dtype=bfloat16``, tables looked up in float32 then
cast; TorchRec: the forward pass under ``torch.autocast("cpu", torch.bfloat16)``, its
FBGEMM tables float32). This machine's cores have AVX512-BF16: XLA's bfloat16 matmul ran at
twice its float32 rate (257 against 127 GFLOP/s, [2048, 1024] x [1024, 1024]).

Each framework runs in its own worker process; the workers stay alive and their timed
blocks are interleaved (repeat r of every worker before repeat r+1), so that a change of
the machine's load hits both alike. Per repeat: ``--steps`` steps after ``--warmup``
untimed ones (compilation included); the table gives medians over ``--repeats``.
The JAX breakdown (``--breakdown-batch-size``) times parts of the step: the forward
loss, forward + backward (gradients materialised), the Adagrad update alone over the
whole parameter tree, and the full step with tiny tables (``--small-cap`` rows each).

    .venv/bin/python benchmarks/ranking_speed.py    # the measured run (results/ranking_speed.md)
    .venv/bin/python benchmarks/ranking_speed.py --quick --steps 2 --repeats 1 --skip-torchrec
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from typing import Any, Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "ranking_speed.md")

# MLPerf Training DLRM-DCNv2 (Criteo 1TB) rows per categorical feature, in feature order.
MLPERF_VOCAB_SIZES = (40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000,
                      3067956, 405282, 10, 2209, 11938, 155, 4, 976, 14, 40000000,
                      40000000, 40000000, 590152, 12973, 108, 36)
NUM_DENSE = 13
FIRST_ID = 2          # ids 0 (PAD) and 1 (OOV) are never drawn (trainers.ranking_features)
LEARNING_RATE = 0.005  # MLPerf reference; trainers.models.dlrm.TRAIN_PRESETS["dlrm-v2"]
BF16 = "-bf16"         # a worker variant's suffix: bfloat16 compute, float32 parameters
PRECISIONS = {"fp32": "", "bf16": BF16}
ADAGRAD_EPS = 1e-8
LABEL_RATE = 0.25
NUM_BATCHES = 4       # distinct synthetic batches cycled through
REPLY = "@@ranking_speed "  # prefix of a worker's answer lines (other output is logged)
# Defaults of the measured run and of the smoke test (--quick).
FULL = dict(batch_sizes=[2048, 8192], vocab_cap=100_000, warmup=2, breakdown_batch_size=2048)
QUICK = dict(batch_sizes=[256], vocab_cap=1_000, warmup=1, breakdown_batch_size=0)

# TorchRec side: versions released together (FBGEMM 1.8 / TorchRec 1.8 <-> PyTorch 2.13).
# torchrec is installed without its dependencies, which name the CUDA build of fbgemm-gpu.
TORCHREC_VENV = os.path.join(os.path.expanduser("~"), ".cache", "recml", "bench-venvs",
                             "torchrec")
TORCH_PINS = ("torch==2.13.0", "fbgemm-gpu-cpu==1.8.0", "numpy==2.4.6",
              "tensordict==0.15.3", "torchmetrics==1.9.0", "pyre-extensions==0.0.32",
              "tqdm==4.70.1")
TORCHREC_PIN = "torchrec==1.8.0"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"  # CPU wheels; PyPI's torch is CUDA


def forward_macs_per_sample() -> dict[str, int]:
  """Multiply-adds of one sample's forward pass per part (the JAX bottom MLP reads the
  13 dense values and their 13 missing indicators)."""
  d = 128 * (len(MLPERF_VOCAB_SIZES) + 1)  # x0 = [bottom output, 26 embeddings]

  def mlp(widths):
    return sum(a * b for a, b in zip(widths[:-1], widths[1:]))

  return {"bottom MLP": mlp((2 * NUM_DENSE, 512, 256, 128)),
          "cross layers": 3 * 2 * d * 512,
          "top MLP": mlp((d, 1024, 1024, 512, 256, 1))}


def table_rows(cap: int) -> tuple[int, ...]:
  """Rows of each table: MLPerf's size capped at ``cap``, plus the PAD and OOV rows."""
  return tuple(min(v, cap) + FIRST_ID for v in MLPERF_VOCAB_SIZES)


def synthetic_batches(rows: tuple[int, ...], batch_size: int, seed: int = 0
                      ) -> list[dict[str, np.ndarray]]:
  """Criteo-shaped batches of the ranking contract (both workers draw the same ones).

  Dense values are z-scores, 10% missing (0 with ``dense_missing`` 1, as preprocessing
  writes them); ids uniform over each table's ``[2, rows)``; labels Bernoulli(0.25).
  """
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(NUM_BATCHES):
    missing = (rng.random((batch_size, NUM_DENSE)) < 0.1).astype(np.float32)
    dense = rng.standard_normal((batch_size, NUM_DENSE)).astype(np.float32) * (1 - missing)
    sparse = np.stack([rng.integers(FIRST_ID, r, batch_size) for r in rows], axis=1)
    batches.append({
        "dense": dense, "dense_missing": missing, "sparse": sparse.astype(np.int32),
        "label": (rng.random(batch_size) < LABEL_RATE).astype(np.float32),
        "weight": np.ones(batch_size, np.float32)})
  return batches


# ---------------------------------------------------------------------------
# Workers: build one model, then time blocks of steps on request
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Runner:
  """A built model: ``run(n)`` times ``n`` steps (seconds); ``info`` describes it."""

  run: Callable[[int], float]
  info: dict[str, Any]


def jax_runner(variant: str, batch_size: int, vocab_cap: int) -> Runner:
  """The project's dlrm-v2 and its train step (or a part of it, for the breakdown)."""
  sys.path.insert(0, ROOT)
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from trainers import configs, models, tasks, train  # pylint: disable=g-import-not-at-top
  from trainers.models.dlrm import TRAIN_PRESETS  # pylint: disable=g-import-not-at-top

  variant, bf16 = variant.removesuffix(BF16), variant.endswith(BF16)
  rows = table_rows(vocab_cap)
  host_batches = synthetic_batches(rows, batch_size)
  model_config = models.model_config("dlrm-v2", vocab_sizes=rows, num_dense=NUM_DENSE,
                                     dtype="bfloat16" if bf16 else "float32")
  config = configs.TrainConfig(model="dlrm-v2", model_config=model_config, **{
      **TRAIN_PRESETS["dlrm-v2"], "batch_size": batch_size, "eval_batch_size": batch_size})
  if config.optimizer != "adagrad" or config.learning_rate != LEARNING_RATE:
    raise ValueError(f"dlrm-v2's trainer preset changed ({config.optimizer}, lr "
                     f"{config.learning_rate}); update LEARNING_RATE and the TorchRec side")

  class SyntheticRanking(tasks.Ranking):
    """The ranking task's loss and initialisation on synthetic shapes (no dataset)."""

    def example_batch(self):
      return {k: v[:1] for k, v in host_batches[0].items()}

  task = SyntheticRanking(config)
  model = models.build("dlrm-v2", model_config)
  tx = train.make_optimizer(config)
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))

  def init_state():
    variables = {k: nn.meta.unbox(v) for k, v in task.init(model, init_rng).items()}
    params = variables.pop("params")
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    if variables:
      state["model_state"] = variables
    return state

  state = jax.jit(init_state)()
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state["params"]))
  table_params = sum(int(np.prod(p.shape))
                     for p in jax.tree.leaves(state["params"]["embeddings"]))
  batches = [jax.device_put(b) for b in host_batches]

  def loss_and_grads(state, batch):
    (loss, _), grads = jax.value_and_grad(task.loss, argnums=1, has_aux=True)(
        model, state["params"], state.get("model_state"), batch, step_rng)
    return loss, grads

  if variant == "train":
    step = jax.jit(train.make_train_step(model, tx, task, step_rng), donate_argnums=(0,))
    call = lambda s, b: step(s, b)
  elif variant == "grad":
    grad_step = jax.jit(loss_and_grads)
    call = lambda s, b: (s, grad_step(s, b))
  elif variant == "forward":
    fwd = jax.jit(lambda s, b: task.loss(model, s["params"], s.get("model_state"), b,
                                         step_rng)[0])
    call = lambda s, b: (s, fwd(s, b))
  elif variant == "optimizer":
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), state["params"])

    def update(s, g):
      updates, opt_state = tx.update(g, s["opt_state"], s["params"])
      return {**s, "params": optax.apply_updates(s["params"], updates),
              "opt_state": opt_state}

    update = jax.jit(update, donate_argnums=(0,))
    call = lambda s, b: (lambda n: (n, n))(update(s, grads))
  else:
    raise ValueError(f"unknown JAX variant {variant!r}")

  holder = {"state": state, "i": 0, "losses": []}

  def run(n: int) -> float:
    out = None
    start = time.perf_counter()
    for _ in range(n):
      holder["state"], out = call(holder["state"], batches[holder["i"] % NUM_BATCHES])
      holder["i"] += 1
    jax.block_until_ready(out)
    seconds = time.perf_counter() - start
    if variant in ("train", "forward"):
      holder["losses"].append(float(out))
    return seconds

  info = {"framework": "jax", "version": f"jax {jax.__version__}",
          "device": str(jax.devices()[0].device_kind), "devices": jax.device_count(),
          "num_params": num_params, "table_params": table_params, "rows": list(rows),
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "losses": holder["losses"]}
  return Runner(run, info)


def torchrec_runner(variant: str, batch_size: int, vocab_cap: int) -> Runner:
  """TorchRec's DLRM_DCN as MLPerf's torchrec_dlrm trains it, on one CPU process."""
  # pylint: disable=g-import-not-at-top
  import torch
  import torch.distributed as dist
  import torchrec
  from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
  from torchrec.datasets.utils import Batch
  from torchrec.distributed import DistributedModelParallel
  from torchrec.distributed.model_parallel import get_default_sharders
  from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
  from torchrec.models.dlrm import DLRM_DCN, DLRMTrain
  from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
  from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
  from torchrec.optim.optimizers import in_backward_optimizer_filter
  import fbgemm_gpu
  # pylint: enable=g-import-not-at-top
  logging.getLogger("torchrec").setLevel(logging.ERROR)  # the planner's tables and hints
  variant, bf16 = variant.removesuffix(BF16), variant.endswith(BF16)
  if variant != "train":
    raise ValueError(f"the TorchRec worker only times the train step, not {variant!r}")

  with socket.socket() as s:  # a free local port for the one-process gloo group
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
  dist.init_process_group("gloo", rank=0, world_size=1)
  torch.manual_seed(0)

  rows = table_rows(vocab_cap)
  names = [f"cat_{i}" for i in range(len(rows))]
  ebc = EmbeddingBagCollection(
      tables=[EmbeddingBagConfig(name=f"t_{n}", embedding_dim=128, num_embeddings=r,
                                 feature_names=[n]) for n, r in zip(names, rows)],
      device=torch.device("meta"))
  dlrm = DLRM_DCN(ebc, dense_in_features=NUM_DENSE, dense_arch_layer_sizes=[512, 256, 128],
                  over_arch_layer_sizes=[1024, 1024, 512, 256, 1], dcn_num_layers=3,
                  dcn_low_rank_dim=512, dense_device=torch.device("cpu"))
  model = DLRMTrain(dlrm)
  num_params = sum(p.numel() for p in model.parameters())
  table_params = sum(p.numel() for p in model.model.sparse_arch.parameters())
  apply_optimizer_in_backward(torch.optim.Adagrad, model.model.sparse_arch.parameters(),
                              {"lr": LEARNING_RATE, "eps": ADAGRAD_EPS})
  planner = EmbeddingShardingPlanner(
      topology=Topology(local_world_size=1, world_size=1, compute_device="cpu"),
      batch_size=batch_size)
  plan = planner.collective_plan(model, get_default_sharders(), dist.GroupMember.WORLD)
  dmp = DistributedModelParallel(module=model, device=torch.device("cpu"), plan=plan)
  dense_opt = KeyedOptimizerWrapper(
      dict(in_backward_optimizer_filter(dmp.named_parameters())),
      lambda params: torch.optim.Adagrad(params, lr=LEARNING_RATE, eps=ADAGRAD_EPS))
  optimizer = CombinedOptimizer([dmp.fused_optimizer, dense_opt])
  kernels = sorted({f"{ps.sharding_type}/{ps.compute_kernel}"
                    for module_plan in plan.plan.values() for ps in module_plan.values()})

  batches = []
  for b in synthetic_batches(rows, batch_size):
    batches.append(Batch(
        dense_features=torch.from_numpy(b["dense"]),
        sparse_features=KeyedJaggedTensor.from_lengths_sync(
            keys=names, values=torch.from_numpy(b["sparse"].T.reshape(-1).astype(np.int64)),
            lengths=torch.ones(len(names) * batch_size, dtype=torch.int32)),
        labels=torch.from_numpy(b["label"])))
  state = {"i": 0, "losses": []}

  def run(n: int) -> float:
    start = time.perf_counter()
    loss = None
    for _ in range(n):
      optimizer.zero_grad()
      with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # forward only
        loss, _ = dmp(batches[state["i"] % NUM_BATCHES])
      loss.backward()
      optimizer.step()
      state["i"] += 1
    seconds = time.perf_counter() - start
    state["losses"].append(float(loss))
    return seconds

  info = {"framework": "torchrec",
          "version": f"torch {torch.__version__}, torchrec {torchrec.__version__}, "
                     f"fbgemm-gpu-cpu {fbgemm_gpu.__version__}",
          "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
          "num_params": num_params, "table_params": table_params, "rows": list(rows),
          "compute_kernels": kernels, "losses": state["losses"]}
  return Runner(run, info)


def worker_main(args: argparse.Namespace) -> int:
  """Builds the runner, warms up, then answers ``<steps>`` lines with timings (JSON lines)."""
  build = {"jax": jax_runner, "torchrec": torchrec_runner}[args.worker]
  runner = build(args.variant, args.batch_size, args.vocab_cap)
  warm = runner.run(args.warmup) if args.warmup else 0.0
  print(REPLY + json.dumps({"warmup_seconds": warm}), flush=True)
  for line in sys.stdin:
    if not line.strip():
      continue
    seconds = runner.run(int(line))
    print(REPLY + json.dumps({"seconds": seconds}), flush=True)
  info = dict(runner.info, peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
  print(REPLY + json.dumps({"info": info}), flush=True)
  return 0


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Job:
  """One worker: what it times and its measurements."""

  label: str
  framework: str
  variant: str
  batch_size: int
  vocab_cap: int
  steps: int = 0
  seconds: list[float] = dataclasses.field(default_factory=list)  # per repeat
  info: dict[str, Any] = dataclasses.field(default_factory=dict)
  proc: subprocess.Popen | None = None

  @property
  def step_ms(self) -> float:
    return 1000 * statistics.median(self.seconds) / self.steps


def ensure_torchrec_venv(path: str) -> str:
  """The venv's python, (re)creating it with the pinned TorchRec stack when needed."""
  python = os.path.join(path, "bin", "python")
  marker = os.path.join(path, "recml-pins.txt")
  wanted = "\n".join(TORCH_PINS + (TORCHREC_PIN,)) + "\n"
  if os.path.exists(marker) and open(marker, encoding="utf-8").read() == wanted:
    return python
  print(f"installing TorchRec into {path} (a few minutes) ...", flush=True)
  subprocess.run([sys.executable, "-m", "venv", "--clear", path], check=True)
  pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
  index: list[str] = []
  try:  # PyTorch's CPU wheel index, where reachable; PyPI's torch is the CUDA build
    urllib.request.urlopen(TORCH_CPU_INDEX + "/torch/", timeout=10).close()
    index = ["--extra-index-url", TORCH_CPU_INDEX]
  except OSError:
    print("  PyTorch's CPU wheel index is unreachable: torch comes from the configured "
          "index (a local CPU wheel if there is one, else PyPI's CUDA build)", flush=True)
  subprocess.run(pip + index + list(TORCH_PINS), check=True)
  subprocess.run(pip + ["--no-deps", TORCHREC_PIN], check=True)
  check = subprocess.run([python, "-c", "import torchrec, fbgemm_gpu"], capture_output=True,
                         text=True)
  if check.returncode:
    raise RuntimeError(f"the TorchRec venv {path} does not import torchrec:\n{check.stderr}")
  with open(marker, "w", encoding="utf-8") as f:
    f.write(wanted)
  return python


def _read(job: Job) -> dict[str, Any]:
  """The worker's next answer (its other output goes to our stderr, labelled)."""
  assert job.proc is not None and job.proc.stdout is not None
  for line in job.proc.stdout:
    if line.startswith(REPLY):
      return json.loads(line[len(REPLY):])
    sys.stderr.write(f"[{job.label}] {line}")
  raise RuntimeError(f"worker {job.label} exited ({job.proc.wait()}) before answering; "
                     "its errors are above")


def run_group(jobs: list[Job], pythons: dict[str, str], args: argparse.Namespace) -> None:
  """Starts the jobs' workers one after another, then interleaves their timed repeats."""
  try:
    for job in jobs:
      print(f"== {job.label}: building and warming up", flush=True)
      job.proc = subprocess.Popen(
          [pythons[job.framework], os.path.abspath(__file__), "--worker", job.framework,
           "--variant", job.variant, "--batch-size", str(job.batch_size),
           "--vocab-cap", str(job.vocab_cap), "--warmup", str(args.warmup)],
          cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
          env={**os.environ, "PYTHONWARNINGS": "ignore"})
      _read(job)  # built and warmed up
      job.steps = args.steps
    for r in range(args.repeats):
      for job in jobs:
        job.proc.stdin.write(f"{args.steps}\n")
        job.proc.stdin.flush()
        job.seconds.append(_read(job)["seconds"])
        print(f"  repeat {r + 1}/{args.repeats} {job.label}: "
              f"{1000 * job.seconds[-1] / args.steps:.0f} ms/step", flush=True)
    for job in jobs:  # end of input: the worker answers with its description and exits
      job.proc.stdin.close()
      job.info = _read(job)["info"]
      job.proc.wait()
  finally:
    for job in jobs:  # after an error: stop this group's workers that still run
      if job.proc is not None and job.proc.poll() is None:
        job.proc.kill()
        job.proc.wait()


def _options(argv: list[str]) -> list[str]:
  """The command-line options that shape the measurement (all but ``--output``)."""
  out, skip = [], False
  for arg in argv:
    if skip:
      skip = False
    elif arg == "--output":
      skip = True
    elif not arg.startswith("--output="):
      out.append(arg)
  return out


def _rate(job: Job) -> str:
  rates = [job.batch_size * job.steps / s for s in job.seconds]
  return f"{statistics.median(rates):,.0f} ({min(rates):,.0f}–{max(rates):,.0f})"


def report(args: argparse.Namespace, speed: list[tuple[Job, Job | None]],
           breakdown: list[Job], load: tuple[tuple[float, ...], tuple[float, ...]]) -> str:
  """The Markdown results page."""
  jax_info = speed[0][0].info
  tr_info = next((t.info for _, t in speed if t is not None), {})
  rows = table_rows(args.vocab_cap)
  lines = [
      "# Ranking train-step speed: dlrm-v2 (JAX) vs TorchRec DLRM_DCN",
      "",
      f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on "
      f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.processor() or 'CPU'}; "
      f"load average {load[0][0]:.1f} at the start, {load[1][0]:.1f} at the end (the cores "
      "are shared: absolute rates vary with other jobs, the interleaved ratio much less). "
      f"Command: `{' '.join(['benchmarks/ranking_speed.py'] + _options(sys.argv[1:]))}`.",
      "",
      f"- JAX: {jax_info.get('version', '?')}, {jax_info.get('devices', '?')} CPU device, "
      f"XLA's intra-op thread pool = {os.cpu_count()} cores (default), XLA_FLAGS="
      f"`{jax_info.get('xla_flags') or '(none)'}`; the train step is "
      "`trainers.train.make_train_step` with `tasks.Ranking`'s loss, jitted, state donated.",
  ]
  if tr_info:
    lines.append(
        f"- TorchRec: {tr_info['version']}; torch.get_num_threads() = {tr_info['threads']} "
        f"(interop {tr_info['interop_threads']}); DistributedModelParallel on one gloo "
        f"process; the planner's sharding/kernel of the tables: "
        f"{', '.join(tr_info['compute_kernels'])} (fused: Adagrad applied in the backward "
        "to the looked-up rows only); dense: torch.optim.Adagrad.")
  lines += [
      f"- Model: MLPerf DLRM-DCNv2 shapes; optimiser Adagrad lr {LEARNING_RATE}, accumulators "
      f"from 0, eps {ADAGRAD_EPS}. Parameters: JAX {jax_info['num_params']:,} "
      f"({jax_info['table_params']:,} in tables)"
      + (f", TorchRec {tr_info['num_params']:,} ({tr_info['table_params']:,} in tables); "
         "the difference is the JAX bottom MLP's 13 extra inputs (the `dense_missing` "
         "indicators of this project's batch contract: 13 x 512 weights)"
         if tr_info else "") + ".",
      f"- Vocabularies: MLPerf's 26 table sizes capped at {args.vocab_cap:,} rows, plus 2 rows "
      f"(PAD, OOV): {', '.join(f'{r:,}' for r in rows)} ({sum(rows):,} rows, "
      f"{sum(rows) * 128 * 4 / 2**30:.2f} GiB of float32 weights). Ids uniform over "
      "`[2, rows)` (every lookup a random row: the worst case for row-sparse updates); "
      f"{NUM_BATCHES} distinct batches cycled.",
      f"- Timing: {args.warmup} warm-up step(s) (compilation included) excluded, then "
      f"{args.steps} timed step(s) per repeat, {args.repeats} repeat(s) interleaved across "
      "frameworks; samples/s = median (min–max over repeats).",
      "",
      "## Throughput",
      "",
      "| precision | batch | JAX dlrm-v2 samples/s | TorchRec DLRM_DCN samples/s | JAX / "
      "TorchRec samples/s (median of paired repeats, range) | "
      "JAX ms/step | TorchRec ms/step | peak RSS GB (JAX / TorchRec) |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for jax_job, tr_job in speed:
    precision = "bf16" if jax_job.variant.endswith(BF16) else "fp32"
    if tr_job is None:
      lines.append(f"| {precision} | {jax_job.batch_size} | {_rate(jax_job)} | — | — | "
                   f"{jax_job.step_ms:.0f} "
                   f"| — | {jax_job.info.get('peak_rss_gb', 0):.2f} / — |")
      continue
    # Repeats ran back to back (interleaved), so each pair saw about the same load.
    ratios = sorted(t / j for j, t in zip(jax_job.seconds, tr_job.seconds))
    lines.append(
        f"| {precision} | {jax_job.batch_size} | {_rate(jax_job)} | {_rate(tr_job)} | "
        f"{statistics.median(ratios):.2f}x ({ratios[0]:.2f}–{ratios[-1]:.2f}) | "
        f"{jax_job.step_ms:.0f} | {tr_job.step_ms:.0f} | "
        f"{jax_job.info.get('peak_rss_gb', 0):.2f} / {tr_job.info.get('peak_rss_gb', 0):.2f} |")
  macs = forward_macs_per_sample()
  flops = 6 * sum(macs.values())  # forward + backward (2 matmuls per forward one), 2 FLOP/MAC
  lines += [
      "",
      f"Work: {sum(macs.values()) / 1e6:.1f} M multiply-adds per sample forward ("
      + ", ".join(f"{k} {v / sum(macs.values()):.0%}" for k, v in macs.items())
      + f"), so ~{flops / 1e6:.0f} MFLOP per sample per train step; the JAX step reaches "
      + ", ".join(f"{flops * j.batch_size / (j.step_ms / 1000) / 1e9:.0f} GFLOP/s at "
                  f"{j.label.removeprefix('JAX ')}" for j, _ in speed)
      + " (medians; the table lookups and updates are memory traffic, not FLOPs).",
  ]
  if breakdown:
    full = next(j for j in breakdown if j.variant == "train" and j.vocab_cap == args.vocab_cap)
    lines += [
        "",
        f"## Where the JAX step goes (batch {full.batch_size})",
        "",
        "| part | ms/step (median) | share of the full step |",
        "|---|---|---|",
    ]
    for job in breakdown:
      lines.append(f"| {job.label} | {job.step_ms:.0f} | {job.step_ms / full.step_ms:.0%} |")
    small = next(j for j in breakdown if j.vocab_cap == args.small_cap)
    update = next(j for j in breakdown if j.variant == "optimizer")
    lines += [
        "",
        f"What depends on the table sizes (dense gradients of whole tables, Adagrad over "
        f"every row): full step minus the tiny-table step = "
        f"{full.step_ms - small.step_ms:.0f} ms "
        f"({(full.step_ms - small.step_ms) / full.step_ms:.0%}); the Adagrad update alone "
        f"over all {full.info.get('num_params', 0):,} parameters = {update.step_ms:.0f} ms "
        f"({update.step_ms / full.step_ms:.0%}). Both grow linearly with the rows.",
    ]
  losses = {j.label: j.info.get("losses", []) for j, _ in speed}
  losses.update({t.label: t.info.get("losses", []) for _, t in speed if t is not None})
  lines += ["", "Sanity: training loss after the warm-up and each timed block (from about "
            "ln 2 = 0.693; the labels are random at rate 0.25, but the same "
            f"{NUM_BATCHES} batches cycle, so both models memorise them and the loss falls "
            "towards 0): "
            + "; ".join(f"{k}: {', '.join(f'{v:.3f}' for v in vs)}"
                        for k, vs in losses.items()) + "."]
  return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch-sizes", type=int, nargs="+",
                      help=f"default {FULL['batch_sizes']} ({QUICK['batch_sizes']} with --quick)")
  parser.add_argument("--precisions", nargs="+", choices=tuple(PRECISIONS),
                      default=list(PRECISIONS), help="default: both, side by side")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int,
                      help=f"untimed steps first (default {FULL['warmup']})")
  parser.add_argument("--vocab-cap", type=int,
                      help=f"rows per table at most, before the PAD and OOV rows (default "
                           f"{FULL['vocab_cap']:,})")
  parser.add_argument("--breakdown-batch-size", type=int,
                      help=f"batch of the JAX breakdown; 0 skips it (default "
                           f"{FULL['breakdown_batch_size']})")
  parser.add_argument("--small-cap", type=int, default=100,
                      help="rows per table of the breakdown's tiny-table step")
  parser.add_argument("--quick", action="store_true",
                      help=f"smoke test only: {QUICK} unless given; writes no file unless "
                           "--output is given (TorchRec's CPU step is several times slower "
                           "with 1,000-row tables than with 100,000-row ones: no comparison)")
  parser.add_argument("--skip-torchrec", action="store_true",
                      help="JAX only (no venv install); prints the table, writes no file "
                           "unless --output is given")
  parser.add_argument("--torchrec-venv", default=TORCHREC_VENV)
  parser.add_argument("--output", default=None,
                      help=f"results file (default {os.path.relpath(RESULTS, ROOT)}; "
                           "none with --skip-torchrec or --quick)")
  # worker mode (internal)
  parser.add_argument("--worker", choices=("jax", "torchrec"), help=argparse.SUPPRESS)
  parser.add_argument("--variant", default="train", help=argparse.SUPPRESS)
  parser.add_argument("--batch-size", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  for name, value in (QUICK if args.quick else FULL).items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  for name in ("steps", "repeats", "vocab_cap", "small_cap"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  if args.warmup < 0 or args.breakdown_batch_size < 0 or min(args.batch_sizes) < 1:
    parser.error("--warmup, --breakdown-batch-size must be >= 0 and --batch-sizes >= 1")
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  if args.worker:
    return worker_main(args)
  output = args.output or (None if args.skip_torchrec or args.quick else RESULTS)
  pythons = {"jax": sys.executable}
  if not args.skip_torchrec:
    pythons["torchrec"] = ensure_torchrec_venv(args.torchrec_venv)
  load_start = os.getloadavg()

  speed: list[tuple[Job, Job | None]] = []
  breakdown: list[Job] = []
  for precision in args.precisions:
    variant = "train" + PRECISIONS[precision]
    for batch_size in args.batch_sizes:
      jax_job = Job(f"JAX {precision} b{batch_size}", "jax", variant, batch_size,
                    args.vocab_cap)
      tr_job = (None if args.skip_torchrec else
                Job(f"TorchRec {precision} b{batch_size}", "torchrec", variant, batch_size,
                    args.vocab_cap))
      group = [jax_job] + ([tr_job] if tr_job else [])
      speed.append((jax_job, tr_job))
      run_group(group, pythons, args)
  if args.breakdown_batch_size:
    b = args.breakdown_batch_size
    breakdown = [
        Job("full train step (forward, backward, Adagrad over every parameter)", "jax",
            "train", b, args.vocab_cap),
        Job("forward + backward, no optimiser (gradients written to fresh buffers, "
            "nothing donated)", "jax", "grad", b, args.vocab_cap),
        Job("forward only (loss)", "jax", "forward", b, args.vocab_cap),
        Job("Adagrad update alone over the whole parameter tree (no model)", "jax",
            "optimizer", b, args.vocab_cap),
        Job(f"full train step with tables of {args.small_cap} rows", "jax", "train", b,
            args.small_cap),
    ]
    run_group(breakdown, pythons, args)
  text = report(args, speed, breakdown, (load_start, os.getloadavg()))
  print(text, flush=True)
  if output:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
      f.write(text)
    print(f"wrote {output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
