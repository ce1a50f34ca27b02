"""Runtime plumbing: the CLI, checks, run records, errors, sharding, host memory, multi-host units."""
