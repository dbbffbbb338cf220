"""Drives a running edge-agent with the stock Python `tritonclient.http` (an unmodified
third-party Open Inference Protocol v2 client), in both of its tensor encodings.

Usage: python3 triton_client.py HOST:PORT EXAMPLES_TOML
Prints one line per check and exits non-zero on the first failure.
"""
import sys
import tomllib

import numpy as np
import tritonclient.http as httpclient


def main() -> int:
    url, examples_path = sys.argv[1], sys.argv[2]
    with open(examples_path, "rb") as f:
        examples = {e["name"]: e for e in tomllib.load(f)["example"]}
    client = httpclient.InferenceServerClient(url=url)
    assert client.is_server_live(), "server not live"
    assert client.is_server_ready(), "server not ready"
    assert client.is_model_ready("digits-edge"), "model not ready"
    meta = client.get_model_metadata("digits-edge")
    assert meta["inputs"][0]["datatype"] == "UINT8", meta
    print("metadata ok:", meta["name"], meta["versions"])

    for name, want_tier, key in [("confident", "edge", "edge_probabilities"), ("unsure", "cloud", "cloud_probabilities")]:
        ex = examples[name]
        for binary in (True, False):
            inp = httpclient.InferInput("input", [1, 64], "UINT8")
            inp.set_data_from_numpy(np.array([ex["pixels"]], dtype=np.uint8), binary_data=binary)
            out = httpclient.InferRequestedOutput("probabilities", binary_data=binary)
            res = client.infer("digits-edge", [inp], outputs=[out])
            probs = res.as_numpy("probabilities")
            params = res.get_response().get("parameters", {})
            assert params.get("tier") == want_tier, (name, binary, params)
            assert probs.shape == (1, 10), probs.shape
            diff = float(np.max(np.abs(probs[0] - np.array(ex[key], dtype=np.float32))))
            assert diff < 1e-4, (name, binary, diff)
            print(f"infer ok: {name} binary={binary} tier={params['tier']} max|diff|={diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
