#!/usr/bin/env bash
# Re-runs every benchmark and rewrites its table in benchmarks/results/ (`make bench`).
# Long: about 2.5 h on 2 CPU cores. Run it on an otherwise idle machine; timings of a busy
# machine are not comparable (each table records its machine and command).
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
data=${DATA_ROOT:-../shared/datasets}
work=${BENCH_WORKDIR:-workdirs/bench}

"$py" benchmarks/preprocess_bench.py --runs 3
"$py" benchmarks/train_bench.py --speed --datasets ml-1m-partial --epochs 6 --large-epochs 4 \
  --results benchmarks/results/train_speed.md --out "$work"
"$py" benchmarks/train_bench.py --datasets ml-1m-partial ml-100k --epochs 60 --large-epochs 20 \
  --set eval_every=5 --set patience=4 --out "$work"
# Ranking step speed against TorchRec (installs it into ~/.cache/recml/bench-venvs/torchrec).
"$py" benchmarks/ranking_speed.py

# Serving: bundles of ml-1m-partial models trained briefly (latency does not depend on quality).
for model in sasrec hstu; do
  "$py" -m pipelines.cli train --data "$work/data/ml-1m-partial" --model "$model" \
    --workdir "$work/serve-$model" --epochs 2
  "$py" -m pipelines.cli export --model-dir "$work/serve-$model" \
    --data "$work/data/ml-1m-partial" --output "$work/bundle-$model"
done
"$py" benchmarks/serving_bench.py --bundle "sasrec=$work/bundle-sasrec" \
  --bundle "hstu=$work/bundle-hstu" --output benchmarks/results/serving.md

# The main job's wall time per step.
"$py" benchmarks/pipeline_bench.py --config ml1m_hstu --data "$data/ml-1m-partial"
