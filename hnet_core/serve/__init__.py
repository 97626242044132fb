"""`hnet serve`: many clients at once on one model (docs/serving.md).

scheduler.py batches requests continuously (no framework), protocol.py speaks OpenAI's API,
app.py is the FastAPI app, cli.py the command. batching.py drives torch and MLX through
hnet_core.engine's Adapter and the backends' batch cache operations; export/serving.py does the
same for ONNX.
"""
