"""saemnesia_jax: SAEmnesia (supervised SAE) and SAeUron concept unlearning in JAX.

Pipeline stages, one module each, each runnable as
``python -m saemnesia_jax.<stage> --config configs/<name>.py``:
sample -> collect -> train -> scores -> evaluate.
"""

__version__ = "0.1.0"
