"""Benchmarks and measurement scripts. Each runs from the repository root as `python -m bench.NAME`
(`python -m bench.quality.NAME` for the bundled model's recipe), so they import the project and each
other as packages and never edit sys.path."""
