"""`hnet serve`: many clients at once on one model (docs/serving.md).

scheduler.py batches requests continuously (no framework), protocol.py speaks OpenAI's API,
app.py is the FastAPI app, cli.py the command. The backends' adapters live beside their models
(hnet_torch/serving.py, hnet_mlx/serving.py, export/serving.py).
"""
