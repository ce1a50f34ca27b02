"""Stand-in classifiers for the tiny pipeline (it draws no real concepts), importable
by a subprocess as ``--config.pipeline.judge=stub_judge:StubJudge`` with tests/ on the path."""
import numpy as np


class StubJudge:
  """object = brighter or darker half of the batch, style = redder or bluer."""

  def predict(self, images):
    x = np.asarray(images)
    obj = (x.mean((1, 2, 3)) > np.median(x.mean((1, 2, 3)))).astype(np.int32)
    sty = (x[..., 0].mean((1, 2)) > x[..., 2].mean((1, 2))).astype(np.int32)
    return obj, sty

  def assess(self, images):
    """``predict`` plus confidences and features (downsampled pixels) for the quality measures."""
    obj, sty = self.predict(images)
    x = np.asarray(images, np.float32)
    conf = np.abs(x.mean((1, 2, 3)) - 0.5) + 0.5
    return {"object": obj, "style": sty, "object_conf": conf, "style_conf": conf,
            "features": x[:, ::4, ::4].reshape(len(x), -1)}
