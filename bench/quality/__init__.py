"""The bundled model's data, recipe and same-compute comparison (see README.md here); run the scripts
as `python -m bench.quality.NAME` from the repository root."""
