"""``recml run | compile | schedule | runs``: the pipeline's command line.

    recml run --config ml100k_smoke --data ../shared/datasets/ml-100k
    recml run --config ml1m_sasrec --target vertex --data gs://bucket/ml-1m --dry-run
    recml run --resume RUN_ID     # a killed/failed local run: reuse its completed steps
    recml compile --config ml1m_hstu --target vertex --output recml_pipeline.yaml
    recml schedule create --config ml1m_sasrec --target vertex --cron "0 3 * * 1" \
        --time-zone Europe/Paris --data gs://bucket/ml-1m --dry-run
    recml runs list
    recml runs show RUN_ID

Environment-specific values (project, region, pipeline root, service account, image
registry, KFP host) come from ``RECML_*`` variables or ``--env-file`` (see
:mod:`pipelines.env`), and the flags below override them. Heavy imports happen inside
the commands.
"""

import argparse
import json
import os
import sys
from typing import Any

TARGETS = ("local", "local-docker", "kfp", "vertex")
DEFAULT_CONFIG = "ml1m_sasrec"


# ---------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------


def _env_flags(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("environment (default: $RECML_* variables / --env-file)")
  g.add_argument("--env-file", help="KEY=VALUE file, e.g. infra/env.sh")
  g.add_argument("--project")
  g.add_argument("--region")
  g.add_argument("--pipeline-root", help="local folder, or gs:// for Vertex")
  g.add_argument("--service-account")
  g.add_argument("--image-registry", help="e.g. us-central1-docker.pkg.dev/PROJECT/recml")
  g.add_argument("--image-tag")
  g.add_argument("--kfp-host", help="KFP API endpoint, e.g. http://localhost:8080")
  g.add_argument("--experiment", help="KFP experiment name")


def _config_flags(p: argparse.ArgumentParser, target_default: str = "local",
                  targets=TARGETS) -> None:
  p.add_argument("--config", default=DEFAULT_CONFIG,
                 help="experiment config: a name under pipelines/configs/ or a path "
                 f"(default {DEFAULT_CONFIG})")
  p.add_argument("--target", choices=targets, default=target_default)
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config entry, e.g. --set train.epochs=2 (repeatable)")
  p.add_argument("--no-cache", action="store_true",
                 help="disable caching of preprocess/train/evaluate")


def register(subparsers) -> None:
  """Adds ``run``, ``compile``, ``schedule`` and ``runs`` to the ``recml`` CLI."""
  p = subparsers.add_parser("run", help="run the pipeline (locally, on KFP or on Vertex AI)",
                            description="Run the pipeline: preprocess, train, evaluate, "
                            "write metrics, gate.")
  _config_flags(p)
  p.add_argument("--data", help="input: a local path, gs:// or bq:// URI, or 'movielens-1m' "
                 "(downloaded once, checksum-verified); default: the config's")
  p.add_argument("--store-uri", help="metrics store: duckdb:///path or bq://project.dataset.table")
  p.add_argument("--run-id", help="default: <config name>-<UTC timestamp>")
  p.add_argument("--resume", metavar="RUN_ID",
                 help="continue a local run that died or failed, with its recorded config, "
                 "data and parameters: a new attempt in its folder reuses the steps it "
                 "completed (same fingerprint) and runs the rest; a killed train step "
                 "continues from its checkpoints")
  p.add_argument("--dry-run", action="store_true",
                 help="print the request (IR path, parameters, worker pools, labels) as JSON")
  p.add_argument("--output", help="where to write the compiled IR for kfp/vertex "
                 "(default: <pipeline root or .>/<run id>.yaml)")
  p.add_argument("-v", "--verbose", action="store_true",
                 help="local targets: also stream what every step prints (by default one "
                 "line per step; the full logs are in <pipeline root>/<run id>/logs/)")
  _env_flags(p)
  p.set_defaults(func=cmd_run, config=None)  # None: --config not given (--resume checks)

  p = subparsers.add_parser("compile", help="compile the pipeline to IR YAML")
  _config_flags(p, target_default="vertex")
  p.add_argument("--output", default="recml_pipeline.yaml")
  _env_flags(p)
  p.set_defaults(func=cmd_compile)

  p = subparsers.add_parser("schedule", help="recurring runs on Vertex AI or KFP")
  ssub = p.add_subparsers(dest="schedule_command", metavar="ACTION", required=True)
  c = ssub.add_parser("create", help="create a schedule")
  _config_flags(c, target_default="vertex", targets=("vertex", "kfp"))
  c.add_argument("--cron", required=True, help='5-field cron, e.g. "0 3 * * 1" (Mondays 03:00)')
  c.add_argument("--time-zone", default="UTC", help="IANA zone, e.g. Europe/Paris")
  c.add_argument("--max-concurrent-runs", type=int, default=1)
  c.add_argument("--name", help="schedule name (default: recml-<config name>)")
  c.add_argument("--data", help="input URI the scheduled runs read (gs:// or bq://)")
  c.add_argument("--store-uri")
  c.add_argument("--output", help="where to write the compiled IR")
  c.add_argument("--dry-run", action="store_true")
  _env_flags(c)
  c.set_defaults(func=cmd_schedule_create)
  c = ssub.add_parser("list", help="list schedules")
  c.add_argument("--target", choices=("vertex", "kfp"), default="vertex")
  c.add_argument("--dry-run", action="store_true")
  _env_flags(c)
  c.set_defaults(func=cmd_schedule_list)
  for action in ("pause", "resume", "delete"):
    c = ssub.add_parser(action, help=f"{action} a schedule")
    c.add_argument("schedule", help="schedule id / resource name (Vertex) or recurring run id (KFP)")
    c.add_argument("--target", choices=("vertex", "kfp"), default="vertex")
    c.add_argument("--dry-run", action="store_true")
    _env_flags(c)
    c.set_defaults(func=cmd_schedule_action, action=action)

  p = subparsers.add_parser("runs", help="local runs and their lineage")
  rsub = p.add_subparsers(dest="runs_command", metavar="ACTION", required=True)
  c = rsub.add_parser("list", help="local runs, newest first")
  c.add_argument("--pipeline-root", help="local pipeline root (default: runs/)")
  c.add_argument("--store-uri")
  c.add_argument("--json", action="store_true")
  c.set_defaults(func=cmd_runs_list)
  c = rsub.add_parser("show", help="a local run's steps, artifacts (URIs, metadata) and metrics")
  c.add_argument("run", help="run id (or a unique prefix)")
  c.add_argument("--pipeline-root")
  c.add_argument("--store-uri")
  c.add_argument("--config", action="store_true",
                 help="also print the run's full config, and nested metadata (every "
                 "hyper-parameter, the data source) in full")
  c.add_argument("--json", action="store_true")
  c.set_defaults(func=cmd_runs_show)


# ---------------------------------------------------------------------------
# Shared plumbing
# ---------------------------------------------------------------------------


def load_env(args: argparse.Namespace):
  from pipelines import env as env_lib  # pylint: disable=g-import-not-at-top
  env = env_lib.load_env(getattr(args, "env_file", None))
  return env.with_overrides(**{f: getattr(args, f, None) for f in env_lib.VARIABLES})


def local_root(env) -> str:
  from pipelines import env as env_lib  # pylint: disable=g-import-not-at-top
  root = env.pipeline_root or env_lib.DEFAULT_LOCAL_ROOT
  if root.startswith("gs://"):
    raise ValueError(f"local runs need a local pipeline root, got {root}")
  return os.path.abspath(root)


def default_store(env, target: str, root: str | None = None) -> str:
  """The metrics store: --store-uri / $RECML_STORE_URI, else DuckDB in the local root."""
  if env.store_uri:
    return env.store_uri
  if target in ("local", "local-docker"):
    return "duckdb:///" + os.path.join(root or local_root(env), "metrics.duckdb")
  raise ValueError(f"target {target!r} needs a metrics store: --store-uri "
                   "bq://PROJECT.DATASET.TABLE (or $RECML_STORE_URI)")


def build(args: argparse.Namespace, env, config: dict[str, Any]):
  """The pipeline function of ``args.target`` for ``config``."""
  from pipelines import dag  # pylint: disable=g-import-not-at-top
  return dag.build_pipeline(
      args.target, env=env, vertex=config["vertex"], kfp_resources=config["kfp"],
      enable_caching=bool(config["caching"]) and not args.no_cache)


def parameters(args, env, config, *, data: str, store_uri: str, run_id: str) -> dict[str, Any]:
  from components import images  # pylint: disable=g-import-not-at-top
  from pipelines import config as config_lib  # pylint: disable=g-import-not-at-top
  beam_args: list[str] = []
  if config["preprocess"]["runner"] == "dataflow":
    if args.target != "vertex":
      raise ValueError("preprocess.runner=dataflow needs --target vertex")
    image = images.image("preprocess", env.image_registry, env.image_tag or None)
    beam_args = config_lib.dataflow_args(env, image, run_id)
  return config_lib.pipeline_parameters(config, data_uri=data, store_uri=store_uri,
                                        run_id=run_id, beam_args=beam_args)


def remote_data(data: str | None, config) -> str:
  data = data or config["data"]
  if not data or not data.startswith(("gs://", "bq://")):
    raise ValueError(f"remote targets read their input from the cloud: pass --data gs://... "
                     f"or bq://... (got {data!r})")
  return data


def _print_json(obj: Any) -> None:
  print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _compile(args, env, config, params, output: str) -> str:
  from pipelines import dag  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  return dag.compile_pipeline(build(args, env, config), output, params)


def vertex_train_specs(args, env, config) -> list[dict[str, Any]]:
  """The training CustomJob's worker pool specs, as the compiled pipeline requests them."""
  from pipelines import dag  # pylint: disable=g-import-not-at-top
  specs = dag.vertex_worker_pool_specs(env, config["vertex"])
  for s in specs:  # the container command is the component's; keep the request readable
    container = s["container_spec"]
    s["container_spec"] = {"image_uri": container["image_uri"]}
    if container.get("env"):
      s["container_spec"]["env"] = container["env"]
  return specs


def check_registry(env, target: str, strict: bool) -> None:
  """Vertex pulls images from a registry: without one the IR names local tags."""
  if target != "vertex" or env.image_registry:
    return
  message = ("no image registry ($RECML_IMAGE_REGISTRY / --image-registry): the IR names "
             "local images that Vertex AI cannot pull")
  if strict:
    raise ValueError(message)
  print(f"warning: {message}", file=sys.stderr)


def _fail(message: str) -> int:
  print(f"error: {message}", file=sys.stderr)
  return 2


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
  from pipelines import config as config_lib  # pylint: disable=g-import-not-at-top
  from pipelines import data as data_lib  # pylint: disable=g-import-not-at-top
  from pipelines import local as local_lib  # pylint: disable=g-import-not-at-top
  from pipelines import submit  # pylint: disable=g-import-not-at-top
  try:
    if args.resume:
      return _resume(args)
    env = load_env(args)
    config = config_lib.load_config(args.config or DEFAULT_CONFIG, args.overrides)
    run_id = args.run_id or local_lib.new_run_id(config["name"])
    if args.target in ("local", "local-docker"):
      root = local_root(env)
      local_lib.check_new_run(root, run_id)
      store_uri = default_store(env, args.target, root)
      data = data_lib.resolve_data(args.data or config["data"])
      params = parameters(args, env, config, data=data, store_uri=store_uri, run_id=run_id)
      if args.dry_run:
        _print_json({"kind": f"kfp.local ({args.target})", "run_id": run_id,
                     "pipeline_root": os.path.join(root, run_id), "parameters": params})
        return 0
      print(f"run id: {run_id}  (logs: {os.path.join(root, run_id, 'logs')}{os.sep})",
            flush=True)
      pipeline = build(args, env, config)
      return _run_local(
          pipeline, params, run_id=run_id, root=root, target=args.target,
          manifest={"config": config["name"], "config_values": config, "data": data,
                    "store_uri": store_uri},
          mounts=_mounts(data, store_uri), verbose=args.verbose)

    data = remote_data(args.data, config)
    store_uri = default_store(env, args.target)
    params = parameters(args, env, config, data=data, store_uri=store_uri, run_id=run_id)
    labels = submit.run_labels(config, run_id, args.target)
    output = args.output or os.path.join(
        env.pipeline_root if env.pipeline_root and not env.pipeline_root.startswith("gs://")
        else ".", f"{run_id}.yaml")
    if args.target == "vertex":
      request = submit.vertex_job_request(template_path=os.path.abspath(output), run_id=run_id,
                                          parameters=params, env=env, labels=labels)
      request["train_worker_pool_specs"] = vertex_train_specs(args, env, config)
    else:
      request = submit.kfp_run_request(package_path=os.path.abspath(output), run_id=run_id,
                                       parameters=params, env=env)
    check_registry(env, args.target, strict=not args.dry_run)
    _compile(args, env, config, params, output)
    if args.dry_run:
      _print_json(request)
      return 0
    print(f"run id: {run_id}", flush=True)
    request = {k: v for k, v in request.items() if k != "train_worker_pool_specs"}
    name = submit.submit_vertex(request) if args.target == "vertex" else submit.submit_kfp(request)
    print(f"submitted: {name}")
    return 0
  except (ValueError, FileNotFoundError, data_lib.DataUnavailable) as e:
    return _fail(str(e))


def _mounts(data: str, store_uri: str) -> list[str]:
  """Host folders the ``local-docker`` steps need: the data and the DuckDB store."""
  mounts = [os.path.dirname(data) if os.path.isfile(data) else data]
  if store_uri.startswith("duckdb:///"):
    mounts.append(os.path.dirname(os.path.abspath(store_uri[len("duckdb:///"):])))
  return mounts


def _resume(args: argparse.Namespace) -> int:
  """``recml run --resume RUN_ID``: a new attempt of a local run that did not succeed."""
  from pipelines import local as local_lib  # pylint: disable=g-import-not-at-top
  run_id = args.resume
  if args.target not in ("local", "local-docker"):
    raise ValueError(f"--resume continues local runs; --target {args.target} reuses completed "
                     "steps through its own caching: submit the run again")
  given = [flag for flag, value in (("--config", args.config), ("--set", args.overrides),
                                    ("--data", args.data), ("--store-uri", args.store_uri),
                                    ("--run-id", args.run_id), ("--no-cache", args.no_cache),
                                    ("--dry-run", args.dry_run), ("--output", args.output))
           if value]
  if given:
    raise ValueError(f"--resume {run_id} runs with the run's recorded config, data and store; "
                     f"drop {', '.join(given)}")
  env = load_env(args)
  root = local_root(env)
  run_dir = os.path.join(root, run_id)
  if not os.path.isfile(os.path.join(run_dir, local_lib.RUN_FILE)):
    recent = [r["run_id"] for r in local_lib.list_runs(root)[:5]]
    raise ValueError(f"no run {run_id!r} under {root}; "
                     + (f"recent runs: {', '.join(recent)}" if recent else "there are no runs"))
  record = local_lib.run_status(local_lib.read_manifest(run_dir), run_dir)
  status = local_lib.status_text(record)
  if record["status"] == "SUCCEEDED":
    print(f"run {run_id} already SUCCEEDED (finished {record.get('finished', '?')}): "
          "nothing to resume")
    return 0
  if record["status"] == "RUNNING" and record.get("pid") is None:
    raise ValueError(f"run {run_id} is RUNNING in {os.path.join(run_dir, local_lib.RUN_FILE)}, "
                     "which names no process to check (an older recml wrote it); if it is "
                     "not running, set its status to FAILED there and resume")
  if record["status"] == "RUNNING":
    raise ValueError(f"run {run_id} is still running (process {record['pid']} on "
                     f"{record.get('host')}): nothing to resume")
  if record.get("orphans"):
    raise ValueError(f"run {run_id}: {status}; wait for them to end (or kill them) "
                     "before resuming")
  missing = [k for k in ("config_values", "parameters", "data", "store_uri") if k not in record]
  if record.get("target") not in ("local", "local-docker"):
    missing.append("a local target")
  if missing:
    raise ValueError(f"{os.path.join(run_dir, local_lib.RUN_FILE)} lacks {', '.join(missing)}: "
                     f"run {run_id} cannot be resumed")
  print(f"run id: {run_id} (resuming; was {status})", flush=True)
  target = record["target"]
  # Resuming reuses this run's own completed steps; the DAG's never-cached steps re-run.
  config = {**record["config_values"], "caching": True}
  args = argparse.Namespace(**{**vars(args), "target": target, "no_cache": False})
  return _run_local(
      build(args, env, config), record["parameters"], run_id=run_id, root=root,
      target=target, mounts=_mounts(record["data"], record["store_uri"]), resume=True,
      verbose=args.verbose)


def _run_local(pipeline, params, *, run_id: str, root: str, **kw) -> int:
  """Runs a local pipeline, then writes its report and prints its summary (failed or not)."""
  import traceback  # pylint: disable=g-import-not-at-top
  from pipelines import local as local_lib  # pylint: disable=g-import-not-at-top
  from pipelines import run_output  # pylint: disable=g-import-not-at-top
  run_dir = os.path.join(root, run_id)
  try:
    local_lib.run_local(pipeline, params, run_id=run_id, root=root, **kw)
  except Exception:  # pylint: disable=broad-except
    try:
      failed = local_lib.read_manifest(run_dir).get("status") == "FAILED"
    except (OSError, ValueError):
      failed = False
    if not failed:  # the run never started: not ours to summarise
      raise
    # Recorded in run.json (status, error, the failed step), shown by the console; the
    # traceback goes to the run's log.
    with open(os.path.join(run_dir, run_output.LOG_DIR, run_output.RUN_LOG), "a",
              encoding="utf-8") as f:
      traceback.print_exc(file=f)
  return _print_summary(run_dir)


def _print_summary(run_dir: str) -> int:
  """Writes the run report (:mod:`pipelines.report`) and prints the run's summary."""
  import traceback  # pylint: disable=g-import-not-at-top
  from pipelines import local as local_lib  # pylint: disable=g-import-not-at-top
  from pipelines import report as report_lib  # pylint: disable=g-import-not-at-top
  from pipelines import run_output  # pylint: disable=g-import-not-at-top
  report, problem = None, None
  try:
    report = report_lib.write_run_report(run_dir)
  except Exception as e:  # pylint: disable=broad-except
    problem = f"{type(e).__name__}: {e}"
    with open(os.path.join(run_dir, run_output.LOG_DIR, run_output.RUN_LOG), "a",
              encoding="utf-8") as f:
      traceback.print_exc(file=f)
  for line in run_output.summary_lines(run_dir, report=report, report_error=problem):
    print(line)
  status = local_lib.read_manifest(run_dir).get("status")
  return 0 if status == "SUCCEEDED" else 1


def cmd_compile(args: argparse.Namespace) -> int:
  from pipelines import config as config_lib  # pylint: disable=g-import-not-at-top
  try:
    env = load_env(args)
    config = config_lib.load_config(args.config, args.overrides)
    params = config_lib.pipeline_parameters(
        config, data_uri=config["data"] if "://" in config["data"] else "",
        store_uri=env.store_uri)
    if config["preprocess"]["runner"] == "dataflow" and args.target == "vertex":
      params = parameters(args, env, config, data=params["data_uri"],
                          store_uri=env.store_uri, run_id="")
    check_registry(env, args.target, strict=False)
    _compile(args, env, config, params, args.output)
    print(f"compiled {config['name']} for {args.target}: {args.output}")
    return 0
  except (ValueError, FileNotFoundError) as e:
    return _fail(str(e))


def cmd_schedule_create(args: argparse.Namespace) -> int:
  from pipelines import config as config_lib  # pylint: disable=g-import-not-at-top
  from pipelines import schedules  # pylint: disable=g-import-not-at-top
  from pipelines import submit  # pylint: disable=g-import-not-at-top
  try:
    env = load_env(args)
    config = config_lib.load_config(args.config, args.overrides)
    name = args.name or f"recml-{config['name']}"
    data = remote_data(args.data, config)
    store_uri = default_store(env, args.target)
    # Scheduled runs take the pipeline job name as run id (run_id left empty).
    params = parameters(args, env, config, data=data, store_uri=store_uri, run_id="")
    output = args.output or f"{name}.yaml"
    if args.target == "vertex":
      job = submit.vertex_job_request(
          template_path=os.path.abspath(output), run_id=name, parameters=params, env=env,
          labels=submit.run_labels(config, name, args.target))
      request = schedules.vertex_schedule_request(
          display_name=name, job=job, cron=args.cron, time_zone=args.time_zone,
          max_concurrent_runs=args.max_concurrent_runs)
      request["train_worker_pool_specs"] = vertex_train_specs(args, env, config)
    else:
      run = submit.kfp_run_request(package_path=os.path.abspath(output), run_id=name,
                                   parameters=params, env=env)
      request = schedules.kfp_recurring_run_request(
          display_name=name, run=run, cron=args.cron, time_zone=args.time_zone,
          max_concurrent_runs=args.max_concurrent_runs)
    check_registry(env, args.target, strict=not args.dry_run)
    _compile(args, env, config, params, output)
    if args.dry_run:
      _print_json(request)
      return 0
    if args.target == "kfp":
      print(f"note: {schedules.KFP_TIME_ZONE_NOTE}", file=sys.stderr)
      print(f"created: {schedules.kfp_create(request)}")
    else:
      request = {k: v for k, v in request.items() if k != "train_worker_pool_specs"}
      print(f"created: {schedules.vertex_create(request)}")
    return 0
  except ValueError as e:
    return _fail(str(e))


def cmd_schedule_list(args: argparse.Namespace) -> int:
  from pipelines import schedules  # pylint: disable=g-import-not-at-top
  try:
    env = load_env(args)
    if args.dry_run:
      where = ({"project": env.project, "location": env.region} if args.target == "vertex"
               else {"host": env.kfp_host})
      _print_json({"kind": f"{args.target}.list_schedules", **where})
      return 0
    items = schedules.vertex_list(env) if args.target == "vertex" else schedules.kfp_list(env)
    for s in items:
      print(f"{s['name']}  {s['display_name']}  {s['cron']}  {s['state']}")
    return 0
  except ValueError as e:
    return _fail(str(e))


def cmd_schedule_action(args: argparse.Namespace) -> int:
  from pipelines import schedules  # pylint: disable=g-import-not-at-top
  try:
    env = load_env(args)
    if args.dry_run:
      where = ({"project": env.project, "location": env.region} if args.target == "vertex"
               else {"host": env.kfp_host})
      _print_json({"kind": f"{args.target}.{args.action}_schedule", "schedule": args.schedule,
                   **where})
      return 0
    if args.target == "vertex":
      schedules.vertex_action(env, args.schedule, args.action)
    else:
      schedules.kfp_action(env, args.schedule, args.action)
    print(f"{args.action}: {args.schedule}")
    return 0
  except ValueError as e:
    return _fail(str(e))


def _store_summaries(store_uri: str) -> dict[str, Any]:
  from components import metrics_store  # pylint: disable=g-import-not-at-top
  if store_uri.startswith("duckdb:///") and not os.path.exists(store_uri[len("duckdb:///"):]):
    return {}
  return {r.run_id: r for r in metrics_store.open_store(store_uri).runs(limit=1000)}


def cmd_runs_list(args: argparse.Namespace) -> int:
  from pipelines import local as local_lib  # pylint: disable=g-import-not-at-top
  env = load_env(args)
  root = local_root(env)
  runs = local_lib.list_runs(root)
  store = _store_summaries(default_store(env, "local", root))
  if args.json:
    _print_json(runs)
    return 0
  if not runs:
    print(f"no runs under {root}")
    return 0
  width = max(10, *(len(local_lib.status_text(r)) for r in runs))
  print(f"{'RUN ID':<44} {'STATUS':<{width}} {'MODEL':<10} {'VALID NDCG@10':>13}  BLESSED")
  for r in runs:
    s = store.get(r["run_id"])
    value = f"{s.value:.4f}" if s and s.value is not None else "-"
    blessed = "-" if not s or s.blessed is None else ("yes" if s.blessed else "no")
    model = r.get("parameters", {}).get("model", "")
    print(f"{r['run_id']:<44} {local_lib.status_text(r):<{width}} {model:<10} {value:>13}  "
          f"{blessed}")
  return 0


def cmd_runs_show(args: argparse.Namespace) -> int:
  from components import metrics_store  # pylint: disable=g-import-not-at-top
  from pipelines import local as local_lib  # pylint: disable=g-import-not-at-top
  from pipelines import run_output  # pylint: disable=g-import-not-at-top
  env = load_env(args)
  root = local_root(env)
  matches = [r["run_id"] for r in local_lib.list_runs(root) if r["run_id"].startswith(args.run)]
  if len(matches) != 1:
    return _fail(f"{len(matches)} runs under {root} match {args.run!r}"
                 + (f": {', '.join(matches)}" if matches else ""))
  run_dir = os.path.join(root, matches[0])
  info = local_lib.lineage(run_dir)
  store_uri = info["run"].get("store_uri") or default_store(env, "local", root)
  rows = []
  try:
    rows = [{"split": r.split, "metric": r.metric, "k": r.k, "value": r.value}
            for r in metrics_store.open_store(store_uri).rows(matches[0])]
  except Exception as e:  # pylint: disable=broad-except
    print(f"warning: metrics store {store_uri}: {e}", file=sys.stderr)
  if args.json:
    _print_json({**info, "metrics_store": {"uri": store_uri, "rows": rows}})
    return 0
  run = info["run"]
  print(f"run {run['run_id']}  {local_lib.status_text(run)}  {run.get('started')} -> "
        f"{run.get('finished', '')}")
  print(f"  config {run.get('config')}  data {run.get('data')}  target {run.get('target')}")
  if args.config:
    import yaml  # pylint: disable=g-import-not-at-top
    print("\nconfig:")
    text = yaml.safe_dump(run.get("config_values") or {}, sort_keys=False)
    print("\n".join(f"  {line}" for line in text.splitlines()))
  timings = run.get("steps") or {}
  for step in info["steps"]:
    cond = f"  [if {step['condition']}]" if step["condition"] else ""
    timing = timings.get(step["step"], {})
    took = f"  {timing['seconds']:.1f}s" if isinstance(timing.get("seconds"), (int, float)) else ""
    print(f"\n{step['step']}: {timing.get('state') or step['status']}{took}{cond}")
    for key, src in step["inputs"].items():
      print(f"  in  {key:<16} <- {src['from']}  {src['uri']}")
    for key, art in step["outputs"].items():
      print(f"  out {key:<16} {art['uri']}")
      for mk, mv in _flat_metadata(art["metadata"], full=args.config):
        print(f"        {mk} = {mv}")
    for key, value in step["values"].items():
      text = value if isinstance(value, str) else json.dumps(value)
      print(f"  val {key:<16} {text if len(text) <= 200 else text[:197] + '...'}")
  if rows:
    print(f"\nmetrics store {store_uri}:")
    for r in rows:
      name = r["metric"] if r["k"] is None else f"{r['metric']}@{r['k']}"
      print(f"  {r['split']:<10} {name:<10} {run_output.number(r['value'])}")
  report = local_lib.report_path(run_dir)
  if report:
    print(f"\nreport: {report}")
  print(f"logs: {os.path.join(run_dir, run_output.LOG_DIR)}{os.sep}")
  return 0


def _flat_metadata(metadata, full: bool) -> list[tuple[str, str]]:
  """Artifact metadata as ``(key, text)``: numbers to 4 significant digits; nested
  mappings (hyper-parameters, source) one entry per key with ``full``, else counted."""
  from pipelines import run_output  # pylint: disable=g-import-not-at-top
  out = []
  for key, value in sorted(metadata.items()):
    if isinstance(value, dict) and full:
      out += [(f"{key}.{k}", t) for k, t in _flat_metadata(value, full)]
    elif isinstance(value, dict):
      out.append((key, f"({len(value)} entries; --config prints them)"))
    elif isinstance(value, list) and not full and len(value) > 10:  # e.g. ROC points
      out.append((key, f"({len(value)} entries; --config prints them)"))
    elif isinstance(value, list):
      out.append((key, json.dumps(value)))
    else:
      out.append((key, run_output.number(value)))
  return out
