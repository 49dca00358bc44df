"""Trains with the project's own model/loss/step/eval code on arrays dumped from the tf.data pipeline."""
import sys, time, json
import jax, jax.numpy as jnp, numpy as np
from flax import linen as nn
from trainers import configs, models, train, evaluate, metrics
data = np.load(sys.argv[1] if sys.argv[1].endswith(".npz") else ".devrun/ml1m.npz")
def split(s): return {k.split("/")[1]: data[k] for k in data.files if k.startswith(s + "/")}
tr, va, te = split("train"), split("valid"), split("test")
def run(name, epochs, every, **over):
  cfg = configs.get_config(name, data_dir="x", vocab_size=3617, epochs=epochs, **over)
  model = models.build(name, cfg.model_config); tx = train.make_optimizer(cfg)
  d = jnp.zeros((1, 200), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.split(jax.random.key(cfg.seed))[0], d, d, d)["params"])
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
  step = jax.jit(train.make_train_step(model, tx, cfg, jax.random.key(1)), donate_argnums=(0,))
  ev = evaluate.make_eval_step(model, cfg)
  def evaluate_split(p, s):
    st = {}
    for lo in range(0, len(s["target"]), 512):
      st = metrics.merge(st, ev(p, {k: v[lo:lo+512] for k, v in s.items()}))
    return metrics.compute(jax.device_get(st))
  n = len(tr["inputs"]); B = cfg.batch_size; best = None; t0 = time.time()
  for e in range(1, epochs + 1):
    perm = np.random.default_rng([cfg.seed, e]).permutation(n)
    perm = np.concatenate([perm, -np.ones((-n) % B, int)])
    tot = 0
    for lo in range(0, len(perm), B):
      idx = perm[lo:lo+B]
      batch = {k: np.where((idx >= 0)[:, None], v[np.maximum(idx, 0)], 0).astype(v.dtype) for k, v in tr.items()}
      state, loss = step(state, batch); tot += float(loss)
    if e % every == 0:
      v, t = evaluate_split(state["params"], va), evaluate_split(state["params"], te)
      if best is None or v["ndcg@10"] > best[1]["ndcg@10"]: best = (e, v, t)
      print(f"{name} {over} epoch {e} loss {tot/(len(perm)//B):.4f} valid ndcg@10 {v['ndcg@10']:.4f} test hr@10 {t['hr@10']:.4f} ndcg@10 {t['ndcg@10']:.4f} [{time.time()-t0:.0f}s]", flush=True)
  print("SELECTED", name, over, best[0], json.dumps({k: round(x, 4) for k, x in best[2].items()}), flush=True)
for spec in [a for a in sys.argv[1:] if not a.endswith(".npz")]:
  name, epochs, every, *kv = spec.split(":")
  run(name, int(epochs), int(every), **{k: eval(v) for k, v in (x.split("=") for x in kv)})
