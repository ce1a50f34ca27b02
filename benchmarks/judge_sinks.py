"""What the CanvasMini object classifiers call an image that holds no object.

  python benchmarks/judge_sinks.py
  python benchmarks/judge_sinks.py --eval_dirs /tmp/seed0/eval,/tmp/seed1/eval

An erasure that destroys the image counts toward UA only if the judge then
names another object. This prints the object classifiers' answers on images
without any object (uniform and Gaussian noise, flat colours; 500 each), for
the shipped ten-object judge and the no-object judge (whose object head can
answer NoObject), and, given evaluation folders, what the judge of those
folders called the images of each erased object under SAEmnesia's sweep at
its strongest gammas (the images it no longer called by their own name). A
concept that is itself a sink (the class noise falls into) cannot be erased
by noise. Writes JSON (--json_out, default
benchmarks/results/canvas_mini/judge_sinks.json).
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def no_object_images(n: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
      "uniform noise": rng.uniform(0, 1, (n, size, size, 3)),
      "gaussian noise (0.5 +- 0.25)": np.clip(0.5 + 0.25 * rng.normal(size=(n, size, size, 3)), 0, 1),
      "flat colours": np.broadcast_to(rng.uniform(0, 1, (n, 1, 1, 3)), (n, size, size, 3)),
  }


def erased_calls(eval_dirs: list[str], objects: list[str], gammas: set[float]) -> collections.Counter:
  """Over the SAEmnesia object sweep units at ``gammas``: what the erased object's
  images were called when not by its own name."""
  out = collections.Counter()
  for d in eval_dirs:
    for f in glob.glob(os.path.join(d, "units", "units", "*_object_saemnesia_sweep_*.json")):
      with open(f) as fh:
        rec = json.load(fh)
      u, r = rec["unit"], rec["result"]
      if u["setting"].get("gamma") not in gammas:
        continue
      cid = objects.index(u["concept"])
      t, p = np.asarray(r["true_object"]), np.asarray(r["pred_object"])
      out.update(name(objects, i) for i in p[t == cid] if i != cid)
  return out


def name(objects: list[str], i: int) -> str:
  from saemnesia_jax.canvas_mini import data
  return data.NO_OBJECT if i < 0 else objects[i]  # the evaluation's NO_OBJECT id is -1


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--n", type=int, default=500)
  ap.add_argument("--size", type=int, default=16, help="image side in px (the shipped CanvasMini samples 16)")
  ap.add_argument("--eval_dirs", default="", help="comma-separated evaluation folders (their units/)")
  ap.add_argument("--gammas", default="-2,-10", help="the sweep gammas whose erased images are counted")
  ap.add_argument("--json_out", default=os.path.join(ROOT, "benchmarks", "results", "canvas_mini",
                                                     "judge_sinks.json"))
  args = ap.parse_args(argv)
  from saemnesia_jax.canvas_mini import data
  from saemnesia_jax.judges.canvas_mini import CanvasMiniJudge
  objects = list(data.OBJECTS)
  size = args.size
  result = {"no_object": {}, "no_object_judge": {}, "erased": {}}
  for key, judge in (("no_object", CanvasMiniJudge()), ("no_object_judge", CanvasMiniJudge(no_object=True))):
    print("the ten-object judge (shipped):" if key == "no_object" else "the no-object judge:")
    for kind, imgs in no_object_images(args.n, size).items():
      obj, _ = judge.predict(np.asarray(imgs, np.float32))
      shares = collections.Counter(name(objects, i) for i in obj)
      result[key][kind] = {k: v / len(obj) for k, v in shares.most_common()}
      print(f"  {kind:30s} " + ", ".join(f"{k} {v / len(obj):.0%}" for k, v in shares.most_common(4)))
  if args.eval_dirs:
    gammas = {float(g) for g in args.gammas.split(",")}
    calls = erased_calls(args.eval_dirs.split(","), objects, gammas)
    total = sum(calls.values())
    result["erased"] = {"gammas": sorted(gammas), "eval_dirs": args.eval_dirs.split(","),
                        "images": total, "called": {k: v / total for k, v in calls.most_common()}}
    print(f"erased objects' images at gammas {sorted(gammas)} not called by their own name ({total}): "
          + ", ".join(f"{k} {v / total:.0%}" for k, v in calls.most_common(5)))
  os.makedirs(os.path.dirname(args.json_out), exist_ok=True)
  with open(args.json_out, "w") as fh:
    json.dump(result, fh, indent=1)
  print(f"wrote {args.json_out}")


if __name__ == "__main__":
  main()
