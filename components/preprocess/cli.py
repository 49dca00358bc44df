"""``recml preprocess``: raw events -> the sequence dataset, or CTR rows -> the ranking dataset.

Registered by ``pipelines/cli.py``; Beam, TensorFlow and tf.transform are
imported only when the command runs, so ``recml --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys

from components.preprocess.sources.common import FORMATS, TIMESTAMP_UNITS


def register(subparsers) -> argparse.ArgumentParser:
  """Adds the ``preprocess`` sub-command."""
  p = subparsers.add_parser(
      "preprocess",
      help="turn raw event logs into the sequence dataset (Beam + tf.transform)",
      description=(
          "Reads raw events (MovieLens files/folders/zips, CSV/TSV, Parquet, "
          "SASRec-style 'user item' pairs, S3Rec-style 'user item item ...' sequences, "
          "or a BigQuery table/query), learns the vocabularies with tf.transform and "
          "writes TFRecord shards per split, transform_fn/, vocab/items.txt, "
          "quarantine/ and dataset_info.json to --output. With --task ranking (implied "
          "by --label, --dense, --categorical, --multi-hot, --time-column, --format "
          "criteo or a Criteo TSV input), reads CTR rows instead (Criteo TSV, or "
          "CSV/Parquet/BigQuery with a column spec) and writes the ranking dataset of "
          "trainers/ranking_features.py: z-scored log1p dense features with missing "
          "indicators, per-feature vocabularies (vocab/<feature>.txt) or hash buckets, "
          "multi-hot lists, split train/valid/test (pre-split files, random or by time)."))
  p.add_argument("--input", required=True,
                 help="a file, a glob, a MovieLens folder or ml-*.zip, or for BigQuery "
                 "bq://project.dataset.table or a SELECT query")
  p.add_argument("--output", required=True, help="dataset directory (local or gs://)")
  p.add_argument("--format", choices=(*FORMATS, "criteo"), default=None,
                 help="input format; detected from file names (and for Criteo TSV, from "
                 "the first line) when omitted")
  p.add_argument("--task", choices=("auto", "sequence", "ranking"), default="auto",
                 help="sequence (retrieval) or ranking (CTR) dataset; auto (default): "
                 "ranking when a ranking flag is given or the input is Criteo TSV")
  p.add_argument("--max-len", type=int, default=200, help="history length (default 200)")
  p.add_argument("--min-item-count", type=int, default=1,
                 help="items seen fewer times map to the OOV id (default 1: keep all)")
  p.add_argument("--bad-rows-threshold", type=float, default=0.01,
                 help="fail when the fraction of malformed rows exceeds this (default 0.01)")
  p.add_argument("--timestamp-unit", choices=("auto", *TIMESTAMP_UNITS), default="auto",
                 help="unit of integer input timestamps; auto (default): from the median "
                 "of a sample (< 1e11: s, < 1e14: ms, < 1e17: us, else ns). The dataset "
                 "holds seconds either way")
  cols = p.add_argument_group("column mapping (csv, parquet, bigquery)")
  for column in ("user", "item", "timestamp", "category", "behavior"):
    cols.add_argument(f"--{column}-col", default=None, metavar="NAME|INDEX",
                      help=f"the {column} column: a header name, or a 0-based index for "
                      "files without a header" + (
                          " (also learns a vocabulary of it)"
                          if column in ("category", "behavior") else ""))
  cols.add_argument("--delimiter", default=None,
                    help="csv field separator (default: from the extension / first line)")
  header = cols.add_mutually_exclusive_group()
  header.add_argument("--header", dest="header", action="store_true", default=None,
                      help="the csv files have a header line")
  header.add_argument("--no-header", dest="header", action="store_false",
                      help="the csv files have no header line")
  p.add_argument("--user-encoding", choices=("vocabulary", "hash"), default="vocabulary")
  p.add_argument("--user-hash-buckets", type=int, default=1 << 20)
  p.add_argument("--num-shards", type=int, default=None,
                 help="TFRecord shards per split (default: from the input size)")
  run_opts = p.add_argument_group("runner")
  run_opts.add_argument("--runner", default="DirectRunner",
                        help="DirectRunner (default) or DataflowRunner")
  run_opts.add_argument("--project", default=None)
  run_opts.add_argument("--region", default=None)
  run_opts.add_argument("--temp-location", default=None, help="gs:// temp for Dataflow")
  run_opts.add_argument("--machine-type", default=None, help="Dataflow worker machine type")
  run_opts.add_argument("--sdk-container-image", default=None,
                        help="worker image (the preprocess image of this project)")
  run_opts.add_argument("--bigquery-method", choices=("DIRECT_READ", "EXPORT"),
                        default="DIRECT_READ")
  run_opts.add_argument("--pipeline-arg", action="append", default=[], dest="pipeline_args",
                        metavar="FLAG", help="extra Beam flag, repeatable")
  rank = p.add_argument_group(
      "ranking (--task ranking)",
      "Column names refer to the header of CSV files (0-based indices without one), "
      "the Parquet schema or the BigQuery columns. Criteo TSV has fixed columns "
      "(label, I1..I13 dense, C1..C26 categorical).")
  rank.add_argument("--label", default=None, help="the label column (values 0/1)")
  rank.add_argument("--dense", action="append", default=[], metavar="A,B",
                    help="numeric columns: log1p(max(x, 0)) z-scored with train statistics, "
                    "plus a missing indicator (empty or NaN = missing)")
  rank.add_argument("--categorical", action="append", default=[], metavar="C,D",
                    help="one-value categorical columns (default: every column without "
                    "another role)")
  rank.add_argument("--multi-hot", action="append", default=[], metavar="COLUMN:SIZE",
                    help="list columns, truncated / 0-padded to SIZE ids (repeatable)")
  rank.add_argument("--multi-hot-separator", default="|",
                    help="separator of list values in text columns (default |)")
  rank.add_argument("--hash-buckets", action="append", default=[], metavar="N|FEATURE=N",
                    help="hash categorical features into N buckets instead of learning a "
                    "vocabulary: N for all, FEATURE=N for one (repeatable)")
  rank.add_argument("--min-count", action="append", default=[], metavar="N|FEATURE=N",
                    help="vocabulary features: values seen fewer times in train map to OOV "
                    "(default 10 for Criteo, else 2); N for all, FEATURE=N for one")
  rank.add_argument("--split", choices=("auto", "files", "random", "time"), default="auto",
                    help="auto (default): pre-split files when named train*/valid*/test*, "
                    "time with --time-column, else random")
  rank.add_argument("--split-ratios", default=None, metavar="TRAIN,VALID,TEST",
                    help="ratios of random and time splits (default 0.8,0.1,0.1)")
  rank.add_argument("--split-seed", type=int, default=0, help="seed of the random split")
  rank.add_argument("--time-column", default=None,
                    help="order rows by this column (numbers or ISO 8601) for --split time")
  p.add_argument("--json", action="store_true", help="print the result as JSON")
  p.set_defaults(func=main)
  return p


def main(args: argparse.Namespace) -> int:
  """Runs the step; returns the exit code (2: bad input)."""
  from components.preprocess import sources, step  # pylint: disable=g-import-not-at-top
  delimiter = args.delimiter
  if delimiter in ("\\t", "tab"):
    delimiter = "\t"
  if resolve_task(args) == "ranking":
    task_args = {"task": "ranking", "ranking": {
        "label": args.label, "dense": args.dense, "categorical": args.categorical,
        "multi_hot": args.multi_hot, "multi_hot_separator": args.multi_hot_separator,
        "hash_buckets": args.hash_buckets, "min_count": args.min_count,
        "split": args.split, "split_ratios": args.split_ratios,
        "split_seed": args.split_seed, "time_column": args.time_column}}
  else:
    task_args = {
        "max_len": args.max_len, "min_item_count": args.min_item_count,
        "columns": sources.ColumnMapping(
            user=args.user_col, item=args.item_col, timestamp=args.timestamp_col,
            category=args.category_col, behavior=args.behavior_col),
        "user_encoding": args.user_encoding, "user_hash_buckets": args.user_hash_buckets,
        "timestamp_unit": args.timestamp_unit}
  try:
    result = step.run(
        args.input, args.output, format=args.format,
        bad_rows_threshold=args.bad_rows_threshold, delimiter=delimiter,
        header=args.header, num_shards=args.num_shards, runner=args.runner,
        project=args.project, region=args.region, temp_location=args.temp_location,
        machine_type=args.machine_type, sdk_container_image=args.sdk_container_image,
        bigquery_method=args.bigquery_method, pipeline_args=args.pipeline_args,
        **task_args)
  except (sources.InputError, step.BadInputError) as e:
    print(f"recml preprocess: error: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
  else:
    print(result.markdown)
    print(f"wrote {result.output_dir} in {result.seconds:.1f} s")
  return 0


RANKING_FLAGS = ("label", "dense", "categorical", "multi_hot", "time_column")


def resolve_task(args: argparse.Namespace) -> str:
  """The task: as given, or ranking when a ranking flag or Criteo TSV says so."""
  if args.task != "auto":
    return args.task
  if args.format == "criteo" or any(getattr(args, f) for f in RANKING_FLAGS):
    return "ranking"
  from components.preprocess import ctr_spec  # pylint: disable=g-import-not-at-top
  if args.format is None and ctr_spec.is_criteo_input(args.input):
    return "ranking"
  return "sequence"
