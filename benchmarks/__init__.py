"""gradloc benchmarks: one module per figure, `benchmarks/run.py` runs them (see README.md)."""
