"""Train-step throughput of the project's step function on the device (batches from the npz dump)."""
import sys, time
import jax, jax.numpy as jnp, numpy as np
from flax import linen as nn
from trainers import configs, models, train
data = np.load(sys.argv[1] if sys.argv[1].endswith(".npz") else ".devrun/ml1m.npz")
tr = {k.split("/")[1]: data[k] for k in data.files if k.startswith("train/")}
n = len(tr["inputs"])
for spec in [a for a in sys.argv[1:] if not a.endswith(".npz")]:
  name, bs = spec.split(":"); bs = int(bs)
  cfg = configs.get_config(name, data_dir="x", vocab_size=3617, batch_size=bs)
  model = models.build(name, cfg.model_config); tx = train.make_optimizer(cfg)
  d = jnp.zeros((1, 200), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.key(0), d, d, d)["params"])
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
  step = jax.jit(train.make_train_step(model, tx, cfg, jax.random.key(1)), donate_argnums=(0,))
  batches = []
  for lo in range(0, n, bs):
    idx = np.arange(lo, lo + bs) % n
    batches.append({k: jax.device_put(v[idx]) for k, v in tr.items()})
  state, loss = step(state, batches[0]); loss.block_until_ready()
  times = []
  for epoch in range(5):
    t = time.perf_counter()
    for b in batches:
      state, loss = step(state, b)
    loss.block_until_ready(); times.append(time.perf_counter() - t)
  med = float(np.median(times))
  print(f"{name} batch {bs}: {med*1000:.1f} ms/epoch ({len(batches)} steps), {n/med:,.0f} sequences/s, {jax.devices()[0].device_kind}", flush=True)
