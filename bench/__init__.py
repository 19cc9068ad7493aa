"""fleetpy's benchmark suite: `python -m bench` runs every benchmark, `--quick` a short version."""
