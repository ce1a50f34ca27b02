"""UA / IRA / CRA on a hand-made answer set, the tables and the figures."""
import csv
import io
import math
import os

import numpy as np
import pytest
from PIL import Image

from saemnesia_jax.evaluation import metrics

# A hand-made answer set: 3 objects, 3 styles, two anchor images (style -1).
# Columns: true object, true style, predicted object, predicted style.
ANSWERS = np.array([
    [0, 0, 0, 0],   # 1
    [0, 0, 1, 0],   # 2
    [0, 1, 2, 1],   # 3
    [0, 1, 0, 0],   # 4
    [1, 0, 1, 0],   # 5
    [1, 0, 1, 0],   # 6
    [1, 1, 1, 1],   # 7
    [1, 1, 0, 1],   # 8
    [2, 0, 2, 0],   # 9
    [2, 1, 0, 1],   # 10
    [1, -1, 1, 0],  # 11 anchor: counts for object accuracy, not for style accuracy
    [2, -1, 2, 1],  # 12 anchor
    [0, 2, 0, 2],   # 13
    [1, 2, 1, 0],   # 14
])
OBJECTS = ["Disk", "Square", "Ring"]
STYLES = ["Stripes", "Checker", "Neon"]

# Worked out by hand from the rows above:
#   object accuracy: obj 0 rows 1,2,3,4,13 -> right 1,4,13 = 3/5
#                    obj 1 rows 5,6,7,8,11,14 -> right 5,6,7,11,14 = 5/6
#                    obj 2 rows 9,10,12 -> right 9,12 = 2/3
#   style accuracy:  sty 0 rows 1,2,5,6,9 -> 5/5;  sty 1 rows 3,4,7,8,10 -> 4/5
#                    sty 2 rows 13,14 -> 1/2       (rows 11, 12 are NO_STYLE)
ACC_OBJ = {0: 3 / 5, 1: 5 / 6, 2: 2 / 3}
ACC_STY = {0: 1.0, 1: 4 / 5, 2: 1 / 2}


def cols(a=ANSWERS):
  return a[:, 0], a[:, 1], a[:, 2], a[:, 3]


def test_per_class_accuracy_by_hand():
  t_obj, t_sty, p_obj, p_sty = cols()
  assert metrics.per_class_accuracy(t_obj, p_obj) == pytest.approx(ACC_OBJ)
  assert metrics.per_class_accuracy(t_sty, p_sty, ignore=(-1,)) == pytest.approx(ACC_STY)


def test_object_erasure_by_hand():
  m = metrics.object_erasure_metrics(*cols(), erased_object=0)
  assert set(m) == {"UA", "IRA", "CRA"}
  assert m["UA"] == pytest.approx(1 - 3 / 5)                 # 0.4
  assert m["IRA"] == pytest.approx((5 / 6 + 2 / 3) / 2)      # 0.75, not pooled 7/9
  assert m["IRA"] != pytest.approx(7 / 9)
  assert m["CRA"] == pytest.approx((1.0 + 0.8 + 0.5) / 3)    # 0.7667, every styled image
  # CRA on the retained objects' images only: sty 0 rows 5,6,9 -> 1; sty 1 rows
  # 7,8,10 -> 1; sty 2 row 14 -> 0.
  m2 = metrics.object_erasure_metrics(*cols(), erased_object=0, cra_exclude_erased=True)
  assert m2["CRA"] == pytest.approx(2 / 3)
  assert (m2["UA"], m2["IRA"]) == (m["UA"], m["IRA"])


def test_style_erasure_by_hand():
  m = metrics.style_erasure_metrics(*cols(), erased_style=1)
  assert m["UA"] == pytest.approx(1 - 4 / 5)                 # 0.2
  assert m["IRA"] == pytest.approx((1.0 + 0.5) / 2)          # 0.75
  assert m["CRA"] == pytest.approx((3 / 5 + 5 / 6 + 2 / 3) / 3)  # 0.7, anchors included


def test_sequential_by_hand():
  m = metrics.sequential_metrics(*cols(), [0, 2])
  assert m["UA"] == pytest.approx(((1 - 3 / 5) + (1 - 2 / 3)) / 2)  # 0.3667
  assert m["IRA"] == pytest.approx(5 / 6)
  assert m["CRA"] == pytest.approx(2.3 / 3)
  s = metrics.sequential_metrics(*cols(), ["stripes", "NEON"], domain="style", style_names=STYLES)
  assert s == pytest.approx({"UA": (0 + 0.5) / 2, "IRA": 0.8, "CRA": 0.7})
  # One erased concept: the same as the single-concept function.
  assert metrics.sequential_metrics(*cols(), [2]) == metrics.object_erasure_metrics(*cols(), 2)


def test_names_and_order_do_not_matter():
  by_name = metrics.object_erasure_metrics(*cols(), "ring", object_names=OBJECTS)
  assert by_name == metrics.object_erasure_metrics(*cols(), 2)
  perm = np.random.default_rng(0).permutation(len(ANSWERS))
  assert metrics.object_erasure_metrics(*cols(ANSWERS[perm]), 2) == pytest.approx(by_name)


@pytest.mark.parametrize("call, words", [
    (lambda: metrics.object_erasure_metrics(*cols(), 5, object_names=OBJECTS),
     ["out of range", "5", "Disk", "Ring"]),
    (lambda: metrics.object_erasure_metrics(*cols(), 7), ["7", "answer set", "0, 1, 2"]),
    (lambda: metrics.object_erasure_metrics(*cols(), 3, object_names=OBJECTS + ["Frame"]),
     ["3 (Frame)", "no images"]),
    (lambda: metrics.object_erasure_metrics(*cols(), "Zebra", object_names=OBJECTS),
     ["Zebra", "Square"]),
    (lambda: metrics.object_erasure_metrics(*cols(), "Disk"), ["object_names"]),
    (lambda: metrics.style_erasure_metrics(*cols(), -1, style_names=STYLES), ["-1", "Checker"]),
    (lambda: metrics.sequential_metrics(*cols(), [0, 1, 2]), ["every object", "IRA"]),
    (lambda: metrics.sequential_metrics(*cols(), [1, 1]), ["repeat"]),
    (lambda: metrics.erasure_metrics(*cols(), [0], "colour"), ["colour", "object"]),
    (lambda: metrics.object_erasure_metrics([0, 1], [0, 0], [0], [0, 0], 0), ["pred_obj", "2"]),
    (lambda: metrics.object_erasure_metrics([0, 1], [-1, -1], [0, 1], [0, 0], 0), ["CRA"]),
])
def test_errors_name_the_problem(call, words):
  with pytest.raises(ValueError) as e:
    call()
  for w in words:
    assert w in str(e.value), (w, str(e.value))


def test_average_table():
  rows = [{"domain": "object", "concept": "Disk", "UA": 0.9, "IRA": 0.8, "CRA": 0.7},
          {"domain": "object", "concept": "Ring", "UA": 0.5, "IRA": 0.6, "CRA": 0.9},
          {"domain": "style", "concept": "Neon", "UA": 1.0, "IRA": 0.95, "CRA": 0.85}]
  t = metrics.average_table(rows)
  assert list(t) == list(metrics.TABLE1_KEYS)
  assert t["object_UA"] == pytest.approx(0.7)
  assert t["object_IRA"] == pytest.approx(0.7)
  assert t["object_CRA"] == pytest.approx(0.8)
  assert (t["style_UA"], t["style_IRA"], t["style_CRA"]) == pytest.approx((1.0, 0.95, 0.85))
  assert t["avg"] == pytest.approx((0.7 + 0.7 + 0.8 + 1.0 + 0.95 + 0.85) / 6)
  only_obj = metrics.average_table(rows[:2])
  assert math.isnan(only_obj["style_UA"]) and math.isnan(only_obj["avg"])
  with pytest.raises(ValueError, match="fraction"):
    metrics.average_table([{"domain": "object", "UA": 95.0, "IRA": 0.5, "CRA": 0.5}])
  with pytest.raises(ValueError, match="domain"):
    metrics.average_table([{"UA": 0.5, "IRA": 0.5, "CRA": 0.5}])


def test_table1_markdown_matches_the_paper():
  md = metrics.format_markdown(metrics.PUBLISHED_TABLE1).splitlines()
  # These lines are copied from docs/method.md section 6 (Table 1 of SAEmnesia).
  assert md[0] == "| method | style UA | IRA | CRA | object UA | IRA | CRA | avg |"
  assert md[1] == "|---|---|---|---|---|---|---|---|"
  assert md[2] == "| ESD | 98.58 | 80.97 | 93.96 | 92.15 | 55.78 | 44.23 | 77.61 |"
  assert md[3] == "| SalUn | 86.26 | 90.39 | 95.08 | 86.91 | 96.35 | 99.59 | 92.43 |"
  assert md[5] == "| SAEmnesia | 96.60 | 98.67 | 99.30 | 94.65 | 91.39 | 88.48 | 94.85 |"
  # The paper prints avg 90.10 for SAeUron; the mean of its six numbers is 90.195.
  assert md[4] == "| SAeUron | 95.80 | 99.10 | 99.40 | 87.16 | 85.57 | 74.14 | 90.19 |"


def test_write_table_and_generic_columns(tmp_path):
  rows = {"saemnesia": metrics.average_table(
              [{"domain": "object", "UA": 0.9, "IRA": 0.8, "CRA": 0.7},
               {"domain": "style", "UA": 1.0, "IRA": 0.95, "CRA": 0.85}]),
          "saeuron": (0.5, 0.25, 1.0, 0.125, 0.0, 1 / 3)}
  md_path, csv_path = metrics.write_table(str(tmp_path / "table1"), rows, title="## CanvasMini")
  md = open(md_path).read()
  assert md.startswith("## CanvasMini\n\n| method |")
  assert "| saeuron | 50.00 | 25.00 | 100.00 | 12.50 | 0.00 | 33.33 | 36.81 |" in md
  got = list(csv.DictReader(io.StringIO(open(csv_path).read())))
  assert [r["method"] for r in got] == ["saemnesia", "saeuron"]
  assert got[0]["object_UA"] == "90.00" and got[0]["avg"] == "86.67"
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
  seq = metrics.format_markdown({"a": {"UA": 0.5, "IRA": float("nan"), "CRA": 1.0}},
                                columns=("UA", "IRA", "CRA"))
  assert seq.splitlines() == ["| method | UA | IRA | CRA |", "|---|---|---|---|", "| a | 50.00 | n/a | 100.00 |"]
  assert metrics.format_csv({"a": (0.5, 1.0)}, columns=("UA", "IRA")) == "method,UA,IRA\na,50.00,100.00\n"
  with pytest.raises(ValueError, match="six"):
    metrics.format_markdown({"a": (0.5, 0.5)})
  with pytest.raises(ValueError, match="2 numbers for 3 columns"):
    metrics.format_csv({"a": (0.5, 0.5)}, columns=("UA", "IRA", "CRA"))


def test_figures(tmp_path):
  p = metrics.plot_table(str(tmp_path / "t.png"), metrics.PUBLISHED_TABLE1, title="Table 1")
  q = metrics.plot_sweep(str(tmp_path / "s.png"), [-1, -5, -10],
                         {"Disk": [{"UA": 0.1, "IRA": 1.0, "CRA": 1.0}, {"UA": 0.6, "IRA": 0.9, "CRA": 1.0},
                                   {"UA": 1.0, "IRA": 0.7, "CRA": 0.9}]})
  for path in (p, q):
    with Image.open(path) as im:
      assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 100
  with pytest.raises(ValueError, match="2 points for 3 gammas"):
    metrics.plot_sweep(str(tmp_path / "x.png"), [-1, -5, -10], {"Disk": [{"UA": 0, "IRA": 0, "CRA": 0}] * 2})


def test_sweep_score():
  assert metrics.sweep_score({"UA": 0.9, "IRA": 0.5, "CRA": 0.0}) == pytest.approx(0.7)
