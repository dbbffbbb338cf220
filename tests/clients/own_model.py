"""The README's "your own model" walkthrough, as a test drives it.

    python3 own_model.py export DIR          # a stock skl2onnx export (zipmap=False) + samples
    python3 own_model.py query HOST:PORT DIR # the stock tritonclient against the agent

`export` trains scikit-learn's LogisticRegression on the iris data set, converts it with
skl2onnx exactly as its documentation shows (only `zipmap=False` added), and saves sample
rows. `query` sends every sample row through an unmodified tritonclient.http and checks the
answers against scikit-learn's own predict_proba. Prints one line per check; non-zero exit
on the first failure.
"""
import sys
from pathlib import Path

import numpy as np


def data():
    from sklearn.datasets import load_iris
    x, y = load_iris(return_X_y=True)
    return x.astype(np.float32), y


def model():
    from sklearn.linear_model import LogisticRegression
    x, y = data()
    return LogisticRegression(max_iter=1000).fit(x, y)


def export(d: Path) -> int:
    from skl2onnx import to_onnx
    x, _ = data()
    onx = to_onnx(model(), x[:1], options={"zipmap": False})
    d.mkdir(parents=True, exist_ok=True)
    (d / "iris.onnx").write_bytes(onx.SerializeToString())
    np.save(d / "iris-samples.npy", x[::7])
    print("exported", d / "iris.onnx", "and", len(x[::7]), "samples")
    return 0


def query(url: str, d: Path) -> int:
    import tritonclient.http as httpclient
    x = np.load(d / "iris-samples.npy")
    want = model().predict_proba(x)
    client = httpclient.InferenceServerClient(url=url)
    assert client.is_model_ready("iris"), "model iris not ready"
    meta = client.get_model_metadata("iris")
    assert meta["inputs"][0]["datatype"] == "FP32", meta
    print("metadata ok:", meta["name"], meta["inputs"][0]["shape"])
    for i, row in enumerate(x):
        inp = httpclient.InferInput("X", [1, 4], "FP32")
        inp.set_data_from_numpy(row[None, :], binary_data=(i % 2 == 0))
        res = client.infer("iris", [inp])
        got = res.as_numpy("probabilities")[0]
        diff = float(np.max(np.abs(got - want[i])))
        assert diff < 1e-4, (i, got, want[i])
        assert got.argmax() == want[i].argmax(), (i, got, want[i])
    print(f"infer ok: {len(x)} rows match scikit-learn's predict_proba within 1e-4")
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "export":
        sys.exit(export(Path(sys.argv[2])))
    sys.exit(query(sys.argv[2], Path(sys.argv[3])))
