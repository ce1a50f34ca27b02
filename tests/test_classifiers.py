"""Tests of the CanvasMini classifiers: the shipped assets, the API, errors, a tiny training run."""
import importlib.util
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from saemnesia_jax.canvas_mini import classifiers as C
from saemnesia_jax.canvas_mini import data as d
from saemnesia_jax.runtime.io_utils import atomic_write_json, hash_files, read_json

CONFIG_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "canvas_mini.py")
FRESH_SEED = 12345  # never used to train or evaluate the shipped classifiers


def _config():
  spec = importlib.util.spec_from_file_location("canvas_mini_config", CONFIG_PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.fixture(scope="module")
def clfs():
  return C.load_classifiers()


@pytest.fixture(scope="module")
def fresh():
  cfg = _config()
  assert FRESH_SEED not in (cfg.data.train_seed, cfg.data.eval_seed)
  return d.sample(440, FRESH_SEED)  # 4 per (object, style class) pair


def test_shipped_classifiers_reach_the_bar(clfs, fresh):
  images, obj, sty = fresh
  po, ps = C.predict(clfs, images)
  acc_o, acc_s = np.mean(po == obj), np.mean(ps == sty)
  assert acc_o >= 0.98, f"object accuracy {acc_o:.3f} on fresh images"
  assert acc_s >= 0.98, f"style accuracy {acc_s:.3f} on fresh images"
  # Slightly blurred and noisy images (like diffusion samples) are still judged right.
  po, ps = C.predict(clfs, C.corrupt(images, FRESH_SEED, noise=0.04, blur=0.5))
  assert np.mean(po == obj) >= 0.95 and np.mean(ps == sty) >= 0.95


def test_classify_matches_predict_and_checks_shapes(clfs, fresh):
  images = fresh[0][:32]
  lo, ls = C.classify(clfs, images)
  assert lo.shape == (32, d.N_OBJECTS) and ls.shape == (32, d.N_STYLE_CLASSES)
  assert lo.dtype == jnp.float32
  po, ps = C.predict(clfs, images, batch_size=20)  # padded last batch
  np.testing.assert_array_equal(po, np.argmax(lo, -1))
  np.testing.assert_array_equal(ps, np.argmax(ls, -1))
  with pytest.raises(ValueError, match=r"\(batch, 16, 16, 3\)"):
    C.classify(clfs, images[..., 0])
  with pytest.raises(ValueError, match="NHWC"):
    C.classify(clfs, np.transpose(images, (0, 3, 1, 2)))


def test_shipped_report(clfs):
  path = C.default_path()
  meta = read_json(os.path.join(path, C.REPORT_FILE))
  assert meta["params_sha256"] == hash_files([os.path.join(path, C.PARAMS_FILE)])
  assert meta["objects"] == list(d.OBJECTS) and meta["style_classes"] == list(d.STYLE_CLASSES)
  assert meta["config"]["data"]["eval_seed"] != meta["config"]["data"]["train_seed"]
  mild = meta["eval"]["corrupted"][0]
  assert mild["noise_sigma"] <= 0.04 and mild["blur_mix"] >= 0.5
  for r, bar in ((meta["eval"]["clean"], 0.98), (mild, 0.95)):
    for head, names in (("object", d.OBJECTS), ("style", d.STYLE_CLASSES)):
      assert set(r[head]["per_class"]) == set(names)
      assert r[head]["accuracy"] >= bar and r[head]["n"] >= 4000
  assert os.path.getsize(os.path.join(path, C.PARAMS_FILE)) < 600_000
  with open(os.path.join(path, C.GRID_FILE), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _copy_assets(tmp_path):
  dst = tmp_path / "clfs"
  shutil.copytree(C.default_path(), dst)
  return dst


def test_missing_assets_name_path_and_command(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    C.load_classifiers(str(tmp_path / "nowhere"))
  assert str(tmp_path / "nowhere") in str(e.value) and C.MAIN_COMMAND in str(e.value)
  dst = _copy_assets(tmp_path)
  os.remove(dst / C.PARAMS_FILE)
  with pytest.raises(FileNotFoundError, match=C.PARAMS_FILE):
    C.load_classifiers(str(dst))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_widths", "bad_json", "old_generator"])
def test_corrupt_assets_give_clear_errors(tmp_path, damage):
  dst = _copy_assets(tmp_path)
  params, report = dst / C.PARAMS_FILE, dst / C.REPORT_FILE
  if damage == "garbage":
    params.write_bytes(b"\x00not msgpack at all")
  elif damage == "truncated":
    params.write_bytes(params.read_bytes()[:1000])
  elif damage == "bad_json":
    report.write_text("{ not json")
  else:
    meta = read_json(str(report))
    if damage == "wrong_widths":
      meta["widths"] = [8, 8, 8]
    else:
      meta["generator_version"] = -1
    atomic_write_json(str(report), meta)
  with pytest.raises(ValueError) as e:
    C.load_classifiers(str(dst))
  assert str(dst) in str(e.value) and C.MAIN_COMMAND in str(e.value)


def test_tiny_training_run_saves_and_reloads(tmp_path):
  cfg = _config()
  cfg.classifier.widths = (4, 8)
  cfg.classifier.steps = 60
  cfg.classifier.batch_size = 32
  cfg.classifier.n_train = 256
  cfg.classifier.n_eval = 110
  cfg.classifier.learning_rate = 1e-2
  cfg.classifier.warmup_steps = 5
  report = C.train_and_save(cfg, str(tmp_path), progress=False)
  loss = report["train"]["history"]["loss"]
  assert loss[-1] < 0.7 * loss[0], f"training did not reduce the loss: {loss}"
  assert set(os.listdir(tmp_path)) >= {C.PARAMS_FILE, C.REPORT_FILE, C.GRID_FILE}
  loaded = C.load_classifiers(str(tmp_path))
  assert loaded.widths == (4, 8) and loaded.image_size == 16
  images, obj, sty = d.sample(110, cfg.data.eval_seed)
  r = C.evaluate(loaded, images, obj, sty)
  # The reloaded classifiers reproduce the accuracies that were written.
  assert r["object"]["accuracy"] == report["eval"]["clean"]["object"]["accuracy"]
  assert r["style"]["accuracy"] == report["eval"]["clean"]["style"]["accuracy"]


def test_config_must_match_the_generator():
  cfg = _config()
  cfg.data.objects = tuple(reversed(cfg.data.objects))
  with pytest.raises(ValueError, match="data.OBJECTS"):
    C.train(cfg, progress=False)
  cfg = _config()
  cfg.data.eval_seed = cfg.data.train_seed
  with pytest.raises(ValueError, match="eval_seed"):
    C.train(cfg, progress=False)
