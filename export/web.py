"""`hnet export onnx --web OUT_DIR`: a static web page that runs the exported model in the browser.

    OUT_DIR/index.html, app.mjs     the page (export/js/web/)
    OUT_DIR/hnet/*.mjs              the JavaScript runtime (export/js/: the same code Node runs)
    OUT_DIR/ort/                    onnxruntime-web's WebAssembly build (from export/js/node_modules)
    OUT_DIR/model/                  the ONNX export (export.json, io.json, config.json, graphs, weights)

Any static file server works (`python -m http.server -d OUT_DIR`); the page fetches nothing beyond
its own host. onnxruntime-web is an npm package, so it is taken from `export/js/node_modules` after
`npm ci` in a source checkout; elsewhere the error says how to get it. Imports neither torch nor MLX.
"""

from __future__ import annotations

import json
import os
import shutil

from hnet_core import io
from hnet_core.errors import HNetError

JS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "js")
ORT_WEB_DIST = os.path.join(JS_DIR, "node_modules", "onnxruntime-web", "dist")
# The WebAssembly-only build of onnxruntime-web and the files it loads at run time.
ORT_WEB_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
RUNTIME_FILES = ("errors.mjs", "rng.mjs", "sampling.mjs", "streaming.mjs", "runtime.mjs", "generate.mjs", "hnet.mjs",
                 "web.mjs")
PAGE_FILES = ("index.html", "app.mjs")


def ort_web_files(dist: str | None = None) -> list[str]:
    """Paths of onnxruntime-web's files, or an HNetError saying how to install them."""
    dist = dist or ORT_WEB_DIST
    missing = [f for f in ORT_WEB_FILES if not os.path.exists(os.path.join(dist, f))]
    if missing:
        raise HNetError(f"onnxruntime-web is not installed ({os.path.join(dist, missing[0])} is missing); in a source "
                        "checkout run `cd export/js && ONNXRUNTIME_NODE_INSTALL=skip npm ci`, then export again")
    return [os.path.join(dist, f) for f in ORT_WEB_FILES]


def is_export_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "export.json"))


def write_web(out_dir: str, export_dir: str, force: bool = False) -> dict[str, int]:
    """Assemble the page around an existing ONNX export; returns {relative path: bytes}."""
    if not is_export_dir(export_dir):
        raise HNetError(f"{export_dir} is not a directory written by `hnet export onnx` (no export.json)")
    with open(os.path.join(export_dir, "export.json"), encoding="utf-8") as f:
        dtype = json.load(f).get("dtype")
    if dtype == "float16":
        # onnxruntime-web 1.30 rejects the float16 graphs at load (a float16 -> float32 cast it inserts
        # itself fails its type check); onnxruntime 1.32 in Python runs them.
        raise HNetError(f"{export_dir} is a float16 export; onnxruntime-web cannot load float16 H-Net graphs yet, "
                        "so the web page needs an export with --dtype float32")
    ort_files = ort_web_files()
    for f in RUNTIME_FILES + tuple(os.path.join("web", p) for p in PAGE_FILES):
        if not os.path.exists(os.path.join(JS_DIR, f)):
            raise HNetError(f"{os.path.join(JS_DIR, f)} is missing; reinstall hnet-mlx")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise HNetError(f"output directory {out_dir} already exists and is not empty; pass --force to overwrite it")
    with io.atomic_directory(out_dir, force=force) as tmp:
        for name in PAGE_FILES:
            shutil.copyfile(os.path.join(JS_DIR, "web", name), os.path.join(tmp, name))
        os.makedirs(os.path.join(tmp, "hnet"))
        for name in RUNTIME_FILES:
            shutil.copyfile(os.path.join(JS_DIR, name), os.path.join(tmp, "hnet", name))
        os.makedirs(os.path.join(tmp, "ort"))
        for path in ort_files:
            shutil.copyfile(path, os.path.join(tmp, "ort", os.path.basename(path)))
        shutil.copytree(export_dir, os.path.join(tmp, "model"))
        sizes = {}
        for root, _, files in os.walk(tmp):
            for f in files:
                path = os.path.join(root, f)
                sizes[os.path.relpath(path, tmp)] = os.path.getsize(path)
    return dict(sorted(sizes.items()))
