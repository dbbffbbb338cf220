#!/usr/bin/env python3
"""Serves an ONNX model over the Open Inference Protocol v2 with MLServer + onnxruntime.

    python3 tests/oip-server/serve.py --model models/cloud/digits-cloud.onnx \
        --name digits-cloud --version 1.0.0 --http-port 8085 --grpc-port 8086 --dir /tmp/m

Writes MLServer's settings into --dir and execs `mlserver start` on it (so a signal to this
process reaches MLServer). Used by the e2e suites (tests/src/oip_server.rs) and the bench.
"""
import argparse
import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True, help="the .onnx file")
ap.add_argument("--name", required=True)
ap.add_argument("--version", default="1.0.0")
ap.add_argument("--output", default="probabilities", help="graph output to answer with")
ap.add_argument("--http-port", type=int, required=True)
ap.add_argument("--grpc-port", type=int, required=True)
ap.add_argument("--dir", required=True, help="folder for MLServer's settings (created)")
a = ap.parse_args()

root = Path(a.dir)
model_dir = root / a.name
model_dir.mkdir(parents=True, exist_ok=True)
shutil.copy(HERE / "onnx_runtime.py", root / "onnx_runtime.py")
(root / "settings.json").write_text(json.dumps({
    "host": "127.0.0.1",
    "http_port": a.http_port,
    "grpc_port": a.grpc_port,
    "metrics_endpoint": None,
    "parallel_workers": 0,
    "debug": False,
}))
(model_dir / "model-settings.json").write_text(json.dumps({
    "name": a.name,
    "implementation": "onnx_runtime.OnnxClassifier",
    "parameters": {"uri": str(Path(a.model).resolve()), "version": a.version,
                   "extra": {"output": a.output}},
}))
os.chdir(root)
sys.path.insert(0, str(root))
# The `mlserver` console script's entry point, run by this very interpreter (so it does not
# matter whether pip put the script on PATH).
os.execv(sys.executable, [sys.executable, "-c",
                          "import sys; from mlserver.cli import main; "
                          "sys.argv = ['mlserver', 'start', sys.argv[1]]; sys.exit(main())",
                          str(root)])
