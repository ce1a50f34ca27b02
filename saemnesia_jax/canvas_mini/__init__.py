"""CanvasMini: the miniature UnlearnCanvas (generator in ``data``, classifiers in
``classifiers``, the base-model build in ``build``).

Importing this package loads nothing heavy; the shipped assets live in
``ASSET_DIR`` (classifiers/) and ``PIPELINE_DIR`` (the diffusers-format model).
"""
import os

ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "canvas_mini")
PIPELINE_DIR = os.path.join(ASSET_DIR, "pipeline")
