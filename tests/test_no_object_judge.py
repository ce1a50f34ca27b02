"""The CanvasMini no-object judge: its training images, the shipped assets, and
how the evaluation reads its "no object" answer (counts as erased for UA, as
lost for IRA and CRA)."""
import os

import jax
import numpy as np
import pytest

from saemnesia_jax.evaluation import concepts
from saemnesia_jax.evaluation import metrics
from saemnesia_jax.runtime.cli import load_config_file
from saemnesia_jax.canvas_mini import classifiers as C
from saemnesia_jax.canvas_mini import data as d
from saemnesia_jax.canvas_mini import styles
from saemnesia_jax.judges.canvas_mini import CanvasMiniJudge
from saemnesia_jax.runtime.io_utils import read_json

CONFIG_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "canvas_mini.py")
FRESH_SEED = 12345  # never used to train or evaluate the shipped classifiers


@pytest.fixture(scope="module")
def judges():
  return C.load_classifiers(), C.load_classifiers(C.default_path(no_object=True))


def test_no_object_images_are_deterministic_and_cover_every_kind():
  a, ka = d.no_object_images(300, 7)
  b, kb = d.no_object_images(300, 7)
  c, _ = d.no_object_images(300, 8)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(ka, kb)
  assert not np.array_equal(a, c)
  assert a.shape == (300, 16, 16, 3) and a.dtype == np.float32 and a.min() >= 0 and a.max() <= 1
  assert set(np.unique(ka)) == set(range(len(d.NO_OBJECT_KINDS)))
  assert 0.4 < np.mean(ka == 0) < 0.6  # half are a style's background alone


def test_backgrounds_are_the_styles_without_their_shape():
  # Comic draws its shape in flat primary colours with a black outline on
  # paper white: its background alone holds neither, so it is near-white paper.
  far = np.full((4, 16, 16), 1e3)
  gx, gy = d._pixel_grid(16)
  ctx = styles.Ctx(gx + 8.0, gy + 8.0, 1.0)
  comic = styles.STYLE_FNS[d.STYLES.index("Comic")](np.random.default_rng(0), far, ctx)
  assert comic.min() > 0.85, "a shapeless Comic image still holds ink or fill"


def test_shipped_no_object_judge(judges):
  base, judge = judges
  assert judge.object_classes == d.OBJECTS + (d.NO_OBJECT,) and judge.no_object
  assert base.object_classes == d.OBJECTS and not base.no_object
  # The style head is the shipped judge's, bit for bit: style readings agree.
  for x, y in zip(jax.tree.leaves(base.params["style"]), jax.tree.leaves(judge.params["style"])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  images, obj, sty = d.sample(440, FRESH_SEED)
  po, ps = C.predict(judge, images)
  assert np.mean(po == obj) >= 0.98 and np.mean(po == d.N_OBJECTS) <= 0.01
  np.testing.assert_array_equal(ps, C.predict(base, images)[1])
  none, _ = d.no_object_images(400, FRESH_SEED)
  assert np.mean(C.predict(judge, none)[0] == d.N_OBJECTS) >= 0.95
  # The ten-object judge cannot answer "no object" and calls these objects.
  assert C.predict(base, none)[0].max() < d.N_OBJECTS
  meta = read_json(os.path.join(C.default_path(no_object=True), C.REPORT_FILE))
  assert meta["objects"][-1] == d.NO_OBJECT and meta["eval"]["no_object"]["called_no_object"] >= 0.95


def test_no_object_training_trains_the_object_head_only(tmp_path):
  cfg = load_config_file(CONFIG_PATH)
  cfg.classifier.steps = 3
  cfg.classifier.batch_size = 16
  cfg.classifier.n_train = 80
  cfg.classifier.n_eval = 40
  cfg.classifier.no_object_share = 0.2
  report = C.train_and_save(cfg, str(tmp_path), progress=False)
  loaded = C.load_classifiers(str(tmp_path))
  base = C.load_classifiers()
  assert loaded.object_classes[-1] == d.NO_OBJECT
  for x, y in zip(jax.tree.leaves(base.params["style"]), jax.tree.leaves(loaded.params["style"])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert set(report["eval"]["no_object"]["per_kind"]) == set(d.NO_OBJECT_KINDS)
  cfg.classifier.no_object_share = 1.0
  with pytest.raises(ValueError, match="no_object_share"):
    C.train(cfg, progress=False)


def test_evaluation_reads_no_object_as_erased_and_as_lost():
  judge = CanvasMiniJudge(no_object=True)
  noise = np.random.default_rng(0).uniform(0, 1, (8, 16, 16, 3)).astype(np.float32)
  obj, _ = judge.predict(noise)
  assert np.all(obj == concepts.NO_OBJECT)
  assert np.all(judge.assess(noise)["object"] == concepts.NO_OBJECT)
  # Two objects x two styles; the erased object 0's images are called "no
  # object", as is one image of the retained object 1.
  t_obj, t_sty = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])
  p_obj, p_sty = np.array([-1, -1, 1, -1]), t_sty
  m = metrics.object_erasure_metrics(t_obj, t_sty, p_obj, p_sty, 0)
  assert m == {"UA": 1.0, "IRA": 0.5, "CRA": 1.0}
  m = metrics.style_erasure_metrics(t_obj, t_sty, p_obj, p_sty, 0)
  assert m["CRA"] == pytest.approx(0.25)  # object 0: 0 of 2, object 1: 1 of 2
  with pytest.raises(ValueError, match="canvas_mini_no_object"):
    CanvasMiniJudge(path=C.default_path(no_object=True))
  assert CanvasMiniJudge().identity != judge.identity
