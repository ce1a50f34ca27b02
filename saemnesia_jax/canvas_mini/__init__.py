"""CanvasMini: the miniature UnlearnCanvas (generator in ``data``, classifiers in ``classifiers``)."""
