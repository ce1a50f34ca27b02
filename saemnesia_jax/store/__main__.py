"""python -m saemnesia_jax.store summary|verify PATH: the store's command line (store.main)."""
import sys

from saemnesia_jax.store import main

sys.exit(main())
