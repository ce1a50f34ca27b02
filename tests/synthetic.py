"""A small activation store with planted concepts, for trainer and scores tests.

Every map of object o and style s is noise plus ``strength`` times a fixed
unit direction for o and one for s, on every token, so a good SAE has a latent
per concept.
"""
import numpy as np

from saemnesia_jax import store

BLOCK = "up_blocks.1.attentions.1"


def make_concept_store(path, n_objects=3, n_styles=2, seeds=4, steps=2, tokens=4, d_in=16,
                       strength=3.0, noise=0.3, seed=0):
  rng = np.random.default_rng(seed)
  dirs = np.linalg.qr(rng.standard_normal((d_in, d_in)))[0][: n_objects + n_styles]
  prompts = [(o, s) for o in range(n_objects) for s in list(range(n_styles)) + [-1]]
  trajs = [(p, sd) for p in range(len(prompts)) for sd in range(seeds)]
  per_unit = 2  # trajectories per unit
  manifest = store.make_manifest(
      model_dir="synthetic", weights_sha256="0" * 64, block=BLOCK, scheduler={"class": "none"},
      num_steps=steps, guidance_scale=1.0,
      prompt_grid={"objects": [f"obj{i}" for i in range(n_objects)],
                   "styles": [f"sty{i}" for i in range(n_styles)], "seeds": list(range(seeds))},
      n_maps=len(trajs) * steps, tokens_per_map=tokens, d_in=d_in, maps_per_unit=per_unit * steps,
      maps_per_chunk=steps, dtype="float16")
  st = store.open_store(str(path), manifest, create=True)
  for u in range(st.n_units):
    rows = []
    labels = {k: [] for k in store.LABEL_FIELDS}
    for p, sd in trajs[u * per_unit:(u + 1) * per_unit]:
      o, s = prompts[p]
      for step in range(steps):
        x = noise * rng.standard_normal((tokens, d_in)) + strength * dirs[o]
        if s >= 0:
          x = x + strength * dirs[n_objects + s]
        rows.append(x)
        for k, v in zip(store.LABEL_FIELDS, (o, s, 999 - step, step, p, sd)):
          labels[k].append(v)
    store.write_unit(st, u, np.stack(rows).astype(np.float32),
                     {k: np.asarray(v, np.int32) for k, v in labels.items()})
  return st, dirs
