"""`hnet serve`: an OpenAI-compatible HTTP server with continuous batching (docs/serving.md).

    hnet serve --backend torch --model hnet_core/demo_model --port 8000
    curl http://127.0.0.1:8000/v1/completions -d '{"prompt": "Once upon", "max_tokens": 32, "temperature": 0}'

uvicorn runs the app in a thread; the scheduler runs the model in the main thread. On SIGTERM or
SIGINT the server stops listening, lets running responses finish for --shutdown-grace seconds,
cancels the rest, and the process exits 0.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading

import click

from ..backends import BACKENDS, DEMO_MODEL, load_model
from ..errors import HNetError
from ..engine import DEFAULT_PREFILL_STEP, check_prefill_step
from .batching import EngineBackend
from .protocol import Limits
from .scheduler import Scheduler


def make_backend(backend: str, path: str, config: str | None, dtype: str | None, device: str | None,
                 threads: int | None = None):
    """The scheduler's backend: the engine's Adapter with the batch cache operations (torch, MLX), or
    export/serving.py (ONNX). threads: CPU threads per operation (torch, onnxruntime)."""
    if backend == "onnx":
        if config is not None or dtype is not None:
            raise HNetError("the onnx backend reads its settings from the exported directory; "
                            "--config/--dtype apply at export time")
        from hnet_export.serving import ServeBackend

        return ServeBackend(path, provider=device or "auto", threads=threads)
    loaded = load_model(backend, path, config=config, dtype=dtype, device=device)
    if threads and backend == "torch":
        importlib.import_module("torch").set_num_threads(threads)
    return EngineBackend(loaded.adapter, importlib.import_module(f"hnet_{backend}.batch_cache"))


def run_server(app, scheduler: Scheduler, host: str, port: int, grace: float, log_level: str = "warning") -> None:
    """uvicorn in a thread, the scheduler loop in this (the main) thread, until SIGTERM/SIGINT.

    uvicorn installs signal handlers only in the main thread, and after its graceful shutdown it
    re-raises the signal (the process would end as killed by it); here the main thread's own
    handlers ask uvicorn to shut down, and a server that stopped cleanly exits 0."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=grace, access_log=False)
    server = uvicorn.Server(config)

    def on_signal(sig, frame) -> None:
        scheduler.stop_accepting()
        if server.should_exit:  # a second signal: stop now
            server.force_exit = True
        server.should_exit = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    http = threading.Thread(target=server.run, name="hnet-serve-http", daemon=True)
    http.start()
    try:
        scheduler.run(keep_going=http.is_alive)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    http.join()
    if not server.started:
        raise HNetError(f"could not serve on {host}:{port} (is the port in use?)")


@click.command("serve")
@click.option("--backend", type=click.Choice(list(BACKENDS)), default="torch", show_default=True)
@click.option("--model", "model_path", default=None,
              help="Model directory (torch/mlx), official .pt checkpoint (torch) or ONNX export directory (onnx). "
                   "Default: the bundled model (torch/mlx).")
@click.option("--config", default=None, help="Config JSON for a .pt checkpoint (torch).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None)
@click.option("--device", default=None, help="torch device (cpu, cuda, mps) or onnx provider (cpu, cuda, auto).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--model-name", default=None, help="The model id clients name (default: the model's directory name).")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 1024),
              help="Requests decoded together (running + prefilling).")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(0, 100000),
              help="Requests that may wait for a batch slot; beyond it: 503 with Retry-After.")
@click.option("--prefill-step-size", default=DEFAULT_PREFILL_STEP, show_default=True, type=int,
              help="Prompt bytes read per scheduler turn, between decode steps of the running batch.")
@click.option("--max-tokens-limit", default=4096, show_default=True, type=click.IntRange(1),
              help="Largest max_tokens a request may ask for (400 beyond).")
@click.option("--max-prompt-bytes", default=65536, show_default=True, type=click.IntRange(1),
              help="Largest prompt in UTF-8 bytes (400 beyond).")
@click.option("--timeout", "request_timeout", default=600.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="Seconds a request may take, waiting included (then 504, or an error event when streaming).")
@click.option("--api-key", default=None, envvar="HNET_API_KEY",
              help="Refuse requests without 'Authorization: Bearer KEY' (401). Also read from $HNET_API_KEY.")
@click.option("--shutdown-grace", default=10.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds running requests get to finish after SIGTERM/SIGINT.")
@click.option("--threads", default=None, type=click.IntRange(1),
              help="CPU threads per operation (torch, onnxruntime; default: theirs). On a busy machine, 1 avoids "
                   "threads spinning against each other.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="warning",
              show_default=True)
def serve_command(backend, model_path, config, dtype, device, host, port, model_name, max_batch, max_queue,
                  prefill_step_size, max_tokens_limit, max_prompt_bytes, request_timeout, api_key, shutdown_grace,
                  threads, log_level):
    """Serve a model over an OpenAI-compatible HTTP API, batching concurrent requests."""
    from .app import create_app

    prefill_step_size = check_prefill_step(prefill_step_size)
    if model_path is None:
        if backend == "onnx":
            raise HNetError("the onnx backend needs --model: a directory written by `hnet export onnx`")
        model_path = DEMO_MODEL
    if not os.path.exists(model_path):
        raise HNetError(f"model not found: {model_path}")
    name = model_name or os.path.basename(os.path.normpath(model_path))
    scheduler = Scheduler(make_backend(backend, model_path, config, dtype, device, threads), max_batch=max_batch,
                          max_queue=max_queue, prefill_step_size=prefill_step_size)
    max_seqlen = getattr(scheduler.backend, "max_seqlen", None)
    if max_seqlen is not None:  # an ONNX export holds at most max_seqlen bytes per sample (BOS included)
        max_tokens_limit = min(max_tokens_limit, max_seqlen - 2)
        max_prompt_bytes = min(max_prompt_bytes, max_seqlen - 2)
    limits = Limits(max_tokens=max_tokens_limit, max_prompt_bytes=max_prompt_bytes, timeout=request_timeout)
    if max_seqlen is not None:
        limits.max_total = max_seqlen - 1
    app = create_app(scheduler, name, limits, api_key=api_key)
    print(f"hnet serve: {backend} backend, model {name!r}, listening on http://{host}:{port}", file=sys.stderr,
          flush=True)
    run_server(app, scheduler, host, port, shutdown_grace, log_level)
