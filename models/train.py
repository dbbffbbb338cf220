#!/usr/bin/env python3
"""Regenerate every artifact under models/ (models, manifests, eval streams, tables).

    pip install -r models/requirements.txt && python3 models/train.py

Deterministic: fixed seeds everywhere and single-threaded BLAS / onnxruntime, so a
rerun on the same machine reproduces every file byte-for-byte (see README.md).
"""
import os

# Multi-threaded BLAS reductions can change float summation order between runs,
# which would change trained weights in the last bits; pin to one thread *before*
# numpy is imported.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import csv
import hashlib
import io
import struct
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod,
                                      QuantFormat, QuantType, quantize_static)
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from scipy.stats import beta as beta_dist

warnings.filterwarnings("ignore", category=ConvergenceWarning)
ort.set_default_logger_severity(3)

HERE = Path(__file__).resolve().parent
EDGE_DIR, CLOUD_DIR, EVAL_DIR = HERE / "edge", HERE / "cloud", HERE / "eval"

MAGIC = b"TIERDEV1"
STREAM_N, DRIFT_N = 20_000, 10_000
THRESHOLDS = [0.50, 0.55, 0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90, 0.95, 0.97, 0.99]
CLOUD_NAME, CLOUD_VERSION = "digits-cloud", "1.0.0"

# Offline certificate (see README "Offline certificate"). Candidates are tested from the
# top down in this fixed order: 1.01 (escalate everything) and then the agent's bin lower
# edges (agent/src/evidence.rs EDGES) in decreasing order; the first failure stops.
CAL_N, CAL_SEED = 20_000, 1003
CAL_TARGET, CAL_DELTA = 0.99, 0.05
CAL_CANDIDATES = [1.01, 0.999, 0.998, 0.995, 0.99, 0.98, 0.97, 0.96, 0.95, 0.925, 0.9, 0.85,
                  0.8, 0.75, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.0]
LABELS = [str(i) for i in range(10)]
OPSET = 16  # what skl2onnx emits for MLPs; <= 17 keeps tract-onnx 0.23 happy


# ----------------------------------------------------------------------------- data
def source_images():
    """load_digits (0..16) mapped to the wire's u8 range exactly as clients do."""
    d = load_digits()
    px = np.round(d.data * 255.0 / 16.0).clip(0, 255).astype(np.uint8)
    return px, d.target.astype(np.uint8)


# Augmentation parameter ranges. "stream" is the in-distribution traffic the cascade
# is tuned on: moderate enough that a tiny model is regularly unsure. "drift" is a
# clearly degraded sensor (much more noise, blur and washed-out contrast).
AUG = {
    "stream": dict(p_shift=0.6, p_blur=0.5, blur=(0.4, 0.9), contrast=(0.55, 1.15),
                   bright=(0.0, 25.0), noise=(4.0, 30.0)),
    "drift": dict(p_shift=0.6, p_blur=1.0, blur=(0.7, 1.2), contrast=(0.4, 0.85),
                  bright=(0.0, 40.0), noise=(25.0, 45.0)),
    # Edge training: only mild perturbations, so the edge is decent but regularly
    # unsure on stream traffic (brighter backgrounds, stronger noise than it saw).
    "edge_train": dict(p_shift=0.3, p_blur=0.3, blur=(0.3, 0.7), contrast=(0.7, 1.1),
                       bright=(0.0, 15.0), noise=(0.0, 15.0)),
    # Cloud training covers a superset of stream's ranges so it stays robust.
    "cloud_train": dict(p_shift=0.7, p_blur=0.6, blur=(0.3, 1.1), contrast=(0.45, 1.25),
                        bright=(0.0, 35.0), noise=(0.0, 40.0)),
}


def augment(px_u8, rng, cfg):
    """Seeded shift / blur / contrast / noise on a batch of u8 images -> u8 images."""
    n = len(px_u8)
    img = px_u8.reshape(n, 8, 8).astype(np.float64)

    # +-1 px shifts with zero fill (no wrap-around: a wrapped stroke is not realistic).
    dx = rng.integers(-1, 2, n) * (rng.random(n) < cfg["p_shift"])
    dy = rng.integers(-1, 2, n) * (rng.random(n) < cfg["p_shift"])
    pad = np.pad(img, ((0, 0), (1, 1), (1, 1)))
    out = np.empty_like(img)
    for i in range(n):
        out[i] = pad[i, 1 + dy[i]:9 + dy[i], 1 + dx[i]:9 + dx[i]]
    img = out

    # Separable 3x3 gaussian blur, per-image sigma; zero padding like a dark border.
    sigma = rng.uniform(*cfg["blur"], n)
    w = np.exp(-1.0 / (2.0 * sigma ** 2)) * (rng.random(n) < cfg["p_blur"])
    w = w[:, None, None]
    p = np.pad(img, ((0, 0), (0, 0), (1, 1)))
    img = (p[:, :, 1:-1] + w * (p[:, :, :-2] + p[:, :, 2:])) / (1 + 2 * w)
    p = np.pad(img, ((0, 0), (1, 1), (0, 0)))
    img = (p[:, 1:-1, :] + w * (p[:, :-2, :] + p[:, 2:, :])) / (1 + 2 * w)

    # Contrast / brightness (lighting), then additive sensor noise.
    c = rng.uniform(*cfg["contrast"], n)[:, None, None]
    b = rng.uniform(*cfg["bright"], n)[:, None, None]
    img = img * c + b
    img = img + rng.normal(0.0, 1.0, img.shape) * rng.uniform(*cfg["noise"], n)[:, None, None]
    return np.round(img).clip(0, 255).astype(np.uint8).reshape(n, 64)


def sample_augmented(px, y, count, rng, cfg):
    """`count` augmented images drawn from (px, y) in a balanced, shuffled cycle."""
    reps = -(-count // len(px))
    idx = np.concatenate([rng.permutation(len(px)) for _ in range(reps)])[:count]
    return augment(px[idx], rng, cfg), y[idx]


def write_stream(path, px, y, severity):
    buf = io.BytesIO()
    buf.write(MAGIC)
    buf.write(struct.pack("<I", len(px)))
    rec = np.empty((len(px), 66), dtype=np.uint8)
    rec[:, 0], rec[:, 1], rec[:, 2:] = y, severity, px
    buf.write(rec.tobytes())
    path.write_bytes(buf.getvalue())


def to_input(px_u8):
    # Must match the manifests' [preprocess]: wire u8 * (1/255 as f32).
    return px_u8.astype(np.float32) * np.float32(1.0 / 255.0)


# ----------------------------------------------------------------------------- onnx
def export_mlp(clf, graph_name, n_features=64):
    """sklearn MLP -> ONNX with only the `probabilities` output.

    ZipMap is off (tract does not run it; `model init` says so). The label branch
    (ArgMax + ai.onnx.ml.ArrayFeatureExtractor) is dropped only to keep the files small
    and reproducible: the runtime reads the probabilities output alone.
    """
    m = convert_sklearn(clf, initial_types=[("input", FloatTensorType([None, n_features]))],
                        options={id(clf): {"zipmap": False}},
                        target_opset={"": OPSET, "ai.onnx.ml": 1})
    g = m.graph
    keep_out = [o for o in g.output if o.name == "probabilities"]
    needed, kept = {"probabilities"}, []
    for node in reversed(list(g.node)):  # backward reachability from the kept output
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
    kept.reverse()
    inits = [t for t in g.initializer if t.name in needed]
    del g.node[:], g.output[:], g.initializer[:]
    g.node.extend(kept)
    g.output.extend(keep_out)
    g.initializer.extend(inits)
    keep_ops = [o for o in m.opset_import if o.domain in ("", "ai.onnx")]
    del m.opset_import[:]
    m.opset_import.extend(keep_ops)
    g.name = graph_name  # skl2onnx picks a random uuid; fixed name => reproducible bytes
    onnx.checker.check_model(m)
    return m


class _Calib(CalibrationDataReader):
    def __init__(self, x):
        self._it = iter([{"input": x[i:i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self._it, None)


def quantize_int8(fp32_model, calib_x, graph_name):
    """Static int8 QDQ quantization of the compute ops only.

    Softmax is deliberately NOT quantized: a DequantizeLinear->Softmax->QuantizeLinear
    chain is folded by tract 0.23 into a lookup table that returns 1.0 for every class.
    Leaving Softmax in float keeps the output exact in both ort and tract. Only
    standard-domain QuantizeLinear/DequantizeLinear are emitted (no com.microsoft ops).
    """
    with tempfile.TemporaryDirectory() as td:
        src, dst = Path(td) / "fp32.onnx", Path(td) / "int8.onnx"
        onnx.save(fp32_model, src)
        quantize_static(str(src), str(dst), _Calib(calib_x),
                        quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["MatMul", "Gemm", "Conv", "Add", "Relu", "MaxPool"],
                        per_channel=False, calibrate_method=CalibrationMethod.MinMax)
        q = onnx.load(str(dst))
    del q.graph.value_info[:]
    q.graph.name = graph_name
    onnx.checker.check_model(q)
    return q


def ort_probs(model_bytes, x):
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    s = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    return s.run(["probabilities"], {"input": x})[0]


def ops(model):
    return sorted({(n.domain or "ai.onnx") + ":" + n.op_type for n in model.graph.node})


# ----------------------------------------------------------------------------- toml
def fnum(v):
    # Shortest decimal that round-trips to the same f32 (valid TOML float).
    s = str(np.float32(v))
    return s if any(ch in s for ch in ".e") else s + ".0"


def farr(a):
    return "[" + ", ".join(fnum(v) for v in a) + "]"


def iarr(a):
    return "[" + ", ".join(str(int(v)) for v in a) + "]"


def write_manifest(path, name, description, onnx_file, golden_px, golden_p, version="1.0.0",
                   calibration=None):
    sha = hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    lines = [
        f'name = "{name}"', f'version = "{version}"', f'description = "{description}"',
        f'file = "{onnx_file.name}"', f'sha256 = "{sha}"', "",
        "[input]", 'name = "input"', "shape = [1, 64]", 'dtype = "FP32"', "",
        "[preprocess]", 'wire_dtype = "UINT8"', "scale = 0.003921569", "offset = 0.0", "",
        "[output]", 'name = "probabilities"', 'kind = "probabilities"',
        "labels = [" + ", ".join(f'"{l}"' for l in LABELS) + "]",
    ]
    if calibration is not None:
        c = calibration
        lines += ["", "[calibration]", 'signal = "max_prob"', f"threshold = {fnum(c['threshold'])}",
                  f"target = {c['target']!r}", f"delta = {c['delta']!r}", f"samples = {c['samples']}",
                  f"disagreements = {c['disagreements']}",
                  f"agreement_lower_bound = {c['agreement_lower_bound']!r}",
                  f"escalation_rate = {c['escalation_rate']!r}",
                  f'reference = "{c["reference"]}"', f'set = "{c["set"]}"']
    for px, p in zip(golden_px, golden_p):
        lines += ["", "[[golden]]", f"input = {iarr(px)}", f"outputs = {farr(p)}",
                  "tolerance = 0.0001"]
    path.write_text("\n".join(lines) + "\n")


def pick_golden(p, n_conf=3, n_unsure=3):
    """First rows (stream order) that are confident / unsure / in between."""
    m = p.max(1)
    conf = np.flatnonzero(m >= 0.99)[:n_conf]
    unsure = np.flatnonzero(m <= 0.6)[:n_unsure - 1]
    mid = np.flatnonzero((m > 0.6) & (m < 0.9))[:1]
    return np.concatenate([conf, unsure, mid])


def pick_examples(y, pe, pc, k=3):
    """Distinct-label examples for the end-to-end tests (see README)."""
    et, ct, em = pe.argmax(1), pc.argmax(1), pe.max(1)
    conf = np.flatnonzero((em >= 0.995) & (et == ct) & (ct == y))
    # Prefer unsure rows where the edge would be wrong and the cloud is clearly right,
    # so a test can tell "escalated" from "answered at the edge" by the answer alone.
    uns_best = np.flatnonzero((em <= 0.6) & (ct == y) & (et != ct) & (pc.max(1) >= 0.9))
    uns_strict = np.flatnonzero((em <= 0.6) & (ct == y) & (et != ct))
    uns_loose = np.flatnonzero((em <= 0.6) & (ct == y))
    out = []
    for kind, cands in (("confident", [conf]), ("unsure", [uns_best, uns_strict, uns_loose])):
        chosen, labels = [], set()
        for pool in cands:
            for i in pool:
                if len(chosen) < k and int(y[i]) not in labels:
                    chosen.append(i)
                    labels.add(int(y[i]))
        assert len(chosen) == k, kind
        out += [(kind if j == 0 else f"{kind}-{j + 1}", i) for j, i in enumerate(chosen)]
    return out


def certify(p_edge, p_ref, reference, set_desc):
    """Fixed-sequence exact certificate of the max-prob threshold (see README).

    For each candidate t (top down): k = samples answered locally (confidence >= t, as f32,
    the agent's rule) whose edge top-1 differs from the reference top-1; U is the exact
    one-sided Clopper-Pearson upper bound on that share at level 1 - delta; t passes iff
    1 - U >= target. Stop at the first failure; the certified threshold is the last pass.
    Returns (certificate dict, table rows for every candidate).
    """
    conf = p_edge.max(1).astype(np.float32)
    wrong = p_edge.argmax(1) != p_ref.argmax(1)
    n = len(conf)
    rows, cert, failed = [], None, False
    for t in CAL_CANDIDATES:
        local = conf >= np.float32(t)
        k = int((local & wrong).sum())
        upper = 1.0 if k == n else float(beta_dist.ppf(1.0 - CAL_DELTA, k + 1, n - k))
        lb = 1.0 - upper
        esc = float((~local).mean())
        ok = lb >= CAL_TARGET
        rows.append((t, k, lb, esc, "pass" if ok and not failed else ("FAIL" if not failed else "-")))
        if not failed and ok:
            cert = dict(threshold=t, target=CAL_TARGET, delta=CAL_DELTA, samples=n, disagreements=k,
                        agreement_lower_bound=lb, escalation_rate=esc, reference=reference,
                        set=set_desc)
        failed = failed or not ok
    return cert, rows


def cascade_rows(p_edge, p_cloud, y):
    """Escalation / cascade accuracy / cloud agreement per threshold, plus the oracle row."""
    et, ct, em = p_edge.argmax(1), p_cloud.argmax(1), p_edge.max(1)
    rows = []
    for t in THRESHOLDS:
        esc = em < t
        ans = np.where(esc, ct, et)
        rows.append([f"{t:.2f}", f"{esc.mean():.4f}", f"{(ans == y).mean():.4f}", f"{(ans == ct).mean():.4f}"])
    orc = et != ct
    rows.append(["oracle", f"{orc.mean():.4f}", f"{(np.where(orc, ct, et) == y).mean():.4f}", "1.0000"])
    return rows


def write_cascade(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["threshold", "escalation_rate", "cascade_accuracy", "cloud_agreement"])
        w.writerows(rows)


def full_knowledge_escalation(p_edge, p_cloud, target=CAL_TARGET):
    """Smallest escalation rate of any max-prob threshold whose cloud agreement >= target,
    knowing every cloud answer (escalate the least confident first)."""
    em = p_edge.max(1)
    wrong = p_edge.argmax(1) != p_cloud.argmax(1)
    order = np.argsort(em, kind="stable")
    n = len(em)
    # After escalating the j least confident, disagreements left = wrong[order[j:]].sum().
    left = np.concatenate([np.cumsum(wrong[order][::-1])[::-1], [0]])
    j = int(np.flatnonzero(left <= (1.0 - target) * n)[0])
    return j / n


# ----------------------------------------------------------------------------- main
def main():
    for d in (EDGE_DIR, CLOUD_DIR, EVAL_DIR):
        d.mkdir(parents=True, exist_ok=True)

    px, y = source_images()
    # Disjoint source images: nothing in the eval streams is derived from a training image.
    px_tr, px_ev, y_tr, y_ev = train_test_split(px, y, test_size=0.4, stratify=y, random_state=0)

    # Independent RNG per artifact so changing one does not reshuffle the others.
    s_px, s_y = sample_augmented(px_ev, y_ev, STREAM_N, np.random.default_rng(1001), AUG["stream"])
    d_px, d_y = sample_augmented(px_ev, y_ev, DRIFT_N, np.random.default_rng(1002), AUG["drift"])
    write_stream(EVAL_DIR / "stream.bin", s_px, s_y, 0)
    write_stream(EVAL_DIR / "drift.bin", d_px, d_y, 1)
    # Calibration set for the offline certificate: independent draws from stream's
    # distribution (same eval-source images and setting, its own seed); not written out.
    k_px, _ = sample_augmented(px_ev, y_ev, CAL_N, np.random.default_rng(CAL_SEED), AUG["stream"])

    # Tiny edge (digits-edge-tiny, the former default): deliberately small and lightly
    # augmented, so it is decent but often unsure on stream traffic. (Clean-only training
    # collapses to ~53% on the stream: it never saw a non-black background.)
    e_px, e_y = sample_augmented(px_tr, y_tr, 10_000, np.random.default_rng(2002), AUG["edge_train"])
    e_px, e_y = np.concatenate([px_tr, e_px]), np.concatenate([y_tr, e_y])
    tiny = MLPClassifier(hidden_layer_sizes=(24,), alpha=1e-3, max_iter=300, random_state=0)
    tiny.fit(to_input(e_px), e_y)

    # Cloud: wide and trained on heavily augmented copies of the train-source images.
    c_px, c_y = sample_augmented(px_tr, y_tr, 60_000, np.random.default_rng(2001), AUG["cloud_train"])
    c_px, c_y = np.concatenate([px_tr, c_px]), np.concatenate([y_tr, c_y])
    xc = to_input(c_px)
    cloud = MLPClassifier(hidden_layer_sizes=(256, 128), alpha=1e-4, batch_size=256,
                          max_iter=40, early_stopping=False, random_state=0)
    cloud.fit(xc, c_y)
    cloud_m = export_mlp(cloud, "digits_cloud")
    cloud_path = CLOUD_DIR / "digits-cloud.onnx"
    onnx.save(cloud_m, cloud_path)
    cloud_bytes = cloud_path.read_bytes()

    # Default edge (digits-edge 2.0.0): 64-128-64-10 distilled from the cloud -- trained on
    # the cloud's own training images (same heavy augmentation), with the committed cloud
    # model's top-1 answers as targets, so it learns to agree with the cloud.
    distil_y = ort_probs(cloud_bytes, xc).argmax(1)
    edge = MLPClassifier(hidden_layer_sizes=(128, 64), alpha=1e-4, batch_size=256,
                         max_iter=40, early_stopping=False, random_state=0)
    edge.fit(xc, distil_y)

    # Calibrate quantization on train-source images plus stream-like augmentation of them,
    # so activation ranges cover realistic traffic without touching eval sources.
    cal_px = np.concatenate([px_tr, augment(px_tr, np.random.default_rng(3001), AUG["stream"])])
    tiny_fp32, edge_fp32 = export_mlp(tiny, "digits_edge_fp32"), export_mlp(edge, "digits_edge_fp32")
    tiny_q = quantize_int8(tiny_fp32, to_input(cal_px), "digits_edge")
    edge_q = quantize_int8(edge_fp32, to_input(cal_px), "digits_edge")

    tiny_path, edge_path = EDGE_DIR / "digits-edge-tiny.onnx", EDGE_DIR / "digits-edge.onnx"
    onnx.save(tiny_q, tiny_path)
    onnx.save(edge_q, edge_path)
    assert edge_path.stat().st_size <= 32 * 1024, edge_path.stat().st_size
    bins = dict(tiny=tiny_path.read_bytes(), edge=edge_path.read_bytes())
    fp32 = dict(tiny=tiny_fp32.SerializeToString(), edge=edge_fp32.SerializeToString())
    skl = dict(tiny=tiny, edge=edge)

    # ---- evaluation (always on the exact bytes written to disk)
    xs, xd, xk = to_input(s_px), to_input(d_px), to_input(k_px)
    p_c, d_c, k_c = ort_probs(cloud_bytes, xs), ort_probs(cloud_bytes, xd), ort_probs(cloud_bytes, xk)
    assert np.abs(p_c - cloud.predict_proba(xs)).max() < 1e-4
    acc = lambda p, t: float((p.argmax(1) == t).mean())
    a = dict(cloud=(acc(p_c, s_y), acc(d_c, d_y)))
    P, report = {}, {}
    for m in ("tiny", "edge"):
        p_ef, p_eq = ort_probs(fp32[m], xs), ort_probs(bins[m], xs)
        d_ef, d_eq = ort_probs(fp32[m], xd), ort_probs(bins[m], xd)
        # Sanity: ONNX export matches sklearn; int8 stays close to fp32; probs are sane.
        assert np.abs(p_ef - skl[m].predict_proba(xs)).max() < 1e-4
        for p in (p_ef, p_eq, d_eq):
            assert np.allclose(p.sum(1), 1.0, atol=1e-4)
            assert (p.max(1) < 0.999999).any() and not np.all(p == 1.0)
        q_gap = np.abs(p_eq - p_ef).max(1)
        a[f"{m}_fp32"] = (acc(p_ef, s_y), acc(d_ef, d_y))
        a[f"{m}_int8"] = (acc(p_eq, s_y), acc(d_eq, d_y))
        P[m] = (p_eq, d_eq, ort_probs(bins[m], xk))
        report[m] = dict(
            q_gap=(q_gap.max(), q_gap.mean(), float((p_eq.argmax(1) == p_ef.argmax(1)).mean())),
            dis=(float((p_eq.argmax(1) != p_c.argmax(1)).mean()),
                 float((d_eq.argmax(1) != d_c.argmax(1)).mean())))
    # The tiny edge is deliberately far behind the cloud; the distilled one is close to it.
    assert a["cloud"][0] - a["tiny_int8"][0] >= 0.05, a

    # ---- cascade tables on stream.bin: escalate when edge max-prob < threshold
    rows = dict(edge=cascade_rows(P["edge"][0], p_c, s_y), tiny=cascade_rows(P["tiny"][0], p_c, s_y))
    write_cascade(EVAL_DIR / "cascade.csv", rows["edge"])
    write_cascade(EVAL_DIR / "cascade-tiny.csv", rows["tiny"])

    # ---- offline certificates on the calibration set (against the committed cloud file)
    set_desc = (f"{CAL_N:,} fresh augmentations (stream setting, seed {CAL_SEED}) "
                f"of the {len(px_ev)} eval-source images")
    reference = f"{CLOUD_NAME}@{CLOUD_VERSION}"
    certs, cert_rows = {}, {}
    for m in ("edge", "tiny"):
        certs[m], cert_rows[m] = certify(P[m][2], k_c, reference, set_desc)

    # ---- manifests with golden vectors (from stream.bin, computed on the committed files)
    gi = pick_golden(P["edge"][0])
    write_manifest(EDGE_DIR / "digits-edge.toml", "digits-edge",
                   "int8 QDQ MLP (64-128-64-10) for 8x8 digits distilled from digits-cloud; edge tier",
                   edge_path, s_px[gi], P["edge"][0][gi], version="2.0.0", calibration=certs["edge"])
    gi = pick_golden(P["tiny"][0])
    write_manifest(EDGE_DIR / "digits-edge-tiny.toml", "digits-edge-tiny",
                   "Small int8 QDQ MLP (64-24-10) for 8x8 digits; edge tier",
                   tiny_path, s_px[gi], P["tiny"][0][gi], calibration=certs["tiny"])
    gi = pick_golden(p_c)
    write_manifest(CLOUD_DIR / "digits-cloud.toml", CLOUD_NAME,
                   "Wide fp32 MLP (64-256-128-10) for 8x8 digits trained on augmented data; cloud tier",
                   cloud_path, s_px[gi], p_c[gi], version=CLOUD_VERSION)

    # ---- named end-to-end examples (default edge model)
    p_eq = P["edge"][0]
    lines = ["# Named examples from eval/stream.bin for end-to-end tests (generated by train.py).",
             "# confident*: edge max prob >= 0.995 and edge top-1 == cloud top-1 == label.",
             "# unsure*:    edge max prob <= 0.6, cloud top-1 == label (preferring edge top-1 != cloud top-1 and cloud max >= 0.9)."]
    for name, i in pick_examples(s_y, p_eq, p_c):
        lines += ["", "[[example]]", f'name = "{name}"', f"label = {int(s_y[i])}",
                  f"pixels = {iarr(s_px[i])}", f"edge_probabilities = {farr(p_eq[i])}",
                  f"cloud_probabilities = {farr(p_c[i])}"]
    (EVAL_DIR / "examples.toml").write_text("\n".join(lines) + "\n")

    # ---- report
    nparams = lambda c: sum(w.size for w in c.coefs_) + sum(b.size for b in c.intercepts_)
    for m, path, q in (("edge", edge_path, edge_q), ("tiny", tiny_path, tiny_q)):
        print(f"{m:5s} : {path.stat().st_size} B, {nparams(skl[m])} params, ops {ops(q)}, "
              f"fp32 onnx {len(fp32[m])} B")
    print(f"cloud : {cloud_path.stat().st_size} B, {nparams(cloud)} params, ops {ops(cloud_m)}")
    for k, (s, d) in a.items():
        print(f"acc {k:10s} stream {s:.4f}  drift {d:.4f}")
    for m in ("edge", "tiny"):
        (gmax, gmean, agree), (ds, dd) = report[m]["q_gap"], report[m]["dis"]
        print(f"{m}: int8 vs fp32 max |dp| {gmax:.4f}, mean max|dp| {gmean:.5f}, top-1 agree {agree:.4f}; "
              f"disagreement with cloud stream {ds:.4f} drift {dd:.4f}")
        print(f"{m}: cascade on stream.bin:", *(",".join(r) for r in rows[m]), sep="\n  ")
    for m in ("edge", "tiny"):
        c = certs[m]
        print(f"{m}: certificate on the calibration set ({set_desc}), target {CAL_TARGET}, delta {CAL_DELTA}:")
        print(f"  {'t':>6} {'k':>6} {'LB':>12} {'escalation':>10}")
        for t, k, lb, esc, st in cert_rows[m]:
            print(f"  {fnum(t):>6} {k:>6} {lb:12.8f} {esc:10.4f}  {st}")
        p_s, p_d, _ = P[m]
        thr = np.float32(c["threshold"])
        for nm, pe, pc in (("stream", p_s, p_c), ("drift", p_d, d_c)):
            esc = pe.max(1) < thr
            agr = np.where(esc, pc.argmax(1), pe.argmax(1)) == pc.argmax(1)
            print(f"  at t={fnum(thr)} on {nm}.bin: escalation {esc.mean():.4f}, cloud agreement "
                  f"{agr.mean():.4f}; full-knowledge escalation for {CAL_TARGET} agreement "
                  f"{full_knowledge_escalation(pe, pc):.4f}")
    for f in sorted(HERE.rglob("*")):
        if f.is_file() and f.suffix in (".onnx", ".toml", ".bin", ".csv"):
            print(hashlib.sha256(f.read_bytes()).hexdigest()[:16], f.stat().st_size, f.relative_to(HERE))


# ----------------------------------------------------------------------------- tabular pair
# A second sample pair with another shape and wire type, to show nothing is digits-specific:
# scikit-learn's breast-cancer data (30 FP32 features, 2 classes), clients send the raw
# features (no [preprocess]). The edge model outputs logits (a linear model, int8 QDQ);
# the cloud model is an fp32 MLP. Both manifests are written by `edge-agent model init`
# from the committed .onnx files and sample rows, exactly as a user would.
TAB_EDGE, TAB_CLOUD = "breast-edge", "breast-cloud"
TAB_STREAM_N, TAB_NOISE = 5_000, 0.35


def tabular_data():
    from sklearn.datasets import load_breast_cancer
    d = load_breast_cancer()
    x, y = d.data.astype(np.float32), d.target.astype(np.int64)
    x_tr, x_ev, y_tr, y_ev = train_test_split(x, y, test_size=0.4, stratify=y, random_state=0)
    return x_tr, x_ev, y_tr, y_ev, [str(n) for n in d.target_names]


def tabular_noisy(x, y, n, rng, sd):
    """n draws of eval rows with Gaussian noise of `TAB_NOISE` feature standard deviations
    (measurement noise: what a sensor in the field adds), clipped at 0 (no feature is
    negative in this data set)."""
    i = rng.integers(0, len(x), n)
    noisy = x[i] + rng.normal(0.0, 1.0, (n, x.shape[1])).astype(np.float32) * (TAB_NOISE * sd)
    return np.maximum(noisy, 0.0).astype(np.float32), y[i]


def linear_logits_model(mean, inv_sd, w, b, graph_name):
    """logits = ((x - mean) * inv_sd) @ w + b as a plain ONNX graph: raw features in, a logits
    output, no Softmax. The standardization stays in float (Sub, Mul are not quantized): raw
    features span 1e-3 to 4e3, which one int8 scale cannot hold."""
    from onnx import TensorProto, helper, numpy_helper
    g = helper.make_graph(
        [helper.make_node("Sub", ["input", "mean"], ["centred"]),
         helper.make_node("Mul", ["centred", "inv_sd"], ["z_in"]),
         helper.make_node("MatMul", ["z_in", "w"], ["z"]),
         helper.make_node("Add", ["z", "b"], ["logits"])],
        graph_name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, w.shape[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, w.shape[1]])],
        [numpy_helper.from_array(a.astype(np.float32), n) for a, n in
         ((mean, "mean"), (inv_sd, "inv_sd"), (w, "w"), (b, "b"))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def ort_run(model_bytes, output, x):
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    s = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    return s.run([output], {"input": x})[0]


def model_init(edge_agent, onnx_path, samples, labels, name, description):
    import subprocess
    out = onnx_path.with_suffix(".toml")
    subprocess.run([edge_agent, "model", "init", str(onnx_path), "--samples", str(samples),
                    "--out", str(out), "--name", name, "--labels", ",".join(labels),
                    "--description", description, "--golden", "6", "--force"], check=True)
    return out


def tabular(edge_agent):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    x_tr, x_ev, y_tr, y_ev, labels = tabular_data()
    sc = StandardScaler().fit(x_tr)
    mean, sd = sc.mean_.astype(np.float32), sc.scale_.astype(np.float32)
    z_tr = sc.transform(x_tr).astype(np.float32)

    # Cloud: MLP on standardized features, the standardization folded into the first layer
    # (clients send raw features; tract has no ai.onnx.ml Scaler).
    cloud = MLPClassifier(hidden_layer_sizes=(64, 32), alpha=1e-3, max_iter=2000, random_state=0)
    cloud.fit(z_tr, y_tr)
    w0, b0 = cloud.coefs_[0], cloud.intercepts_[0]
    cloud.coefs_[0] = (w0 / sd[:, None]).astype(np.float64)
    cloud.intercepts_[0] = b0 - (mean / sd) @ w0
    cloud_path = CLOUD_DIR / f"{TAB_CLOUD}.onnx"
    onnx.save(export_mlp(cloud, "breast_cloud", n_features=x_tr.shape[1]), cloud_path)

    # Edge: a strongly regularized logistic regression, as logits [-z/2, z/2] (softmax of
    # them is the sigmoid of z); int8 QDQ.
    lr = LogisticRegression(C=0.01, max_iter=1000).fit(z_tr, y_tr)
    w, b = lr.coef_[0], lr.intercept_[0]
    W = np.stack([-w / 2, w / 2], axis=1)
    B = np.array([-b / 2, b / 2])
    fp32 = linear_logits_model(mean, 1.0 / sd, W, B, "breast_edge_fp32")
    edge_q = quantize_int8(fp32, x_tr, "breast_edge")
    edge_path = EDGE_DIR / f"{TAB_EDGE}.onnx"
    onnx.save(edge_q, edge_path)

    # Evaluation stream: noisy draws of the eval rows (features float32, labels int64).
    xs, ys = tabular_noisy(x_ev, y_ev, TAB_STREAM_N, np.random.default_rng(4001), sd)
    np.save(EVAL_DIR / "breast-stream.npy", xs)
    np.save(EVAL_DIR / "breast-stream-labels.npy", ys)

    model_init(edge_agent, edge_path, EVAL_DIR / "breast-stream.npy", labels, TAB_EDGE,
               "int8 QDQ logistic regression (30 raw features, logits) for breast-cancer data; edge tier")
    model_init(edge_agent, cloud_path, EVAL_DIR / "breast-stream.npy", labels, TAB_CLOUD,
               "fp32 MLP (30-64-32-2) for breast-cancer data; cloud tier")

    pe = ort_run(edge_path.read_bytes(), "logits", xs)
    pe = np.exp(pe - pe.max(1, keepdims=True)); pe /= pe.sum(1, keepdims=True)
    pc = ort_run(cloud_path.read_bytes(), "probabilities", xs)
    acc = lambda p: float((p.argmax(1) == ys).mean())
    print(f"{TAB_EDGE}: {edge_path.stat().st_size} B, ops {ops(edge_q)}, stream acc {acc(pe):.4f}")
    print(f"{TAB_CLOUD}: {cloud_path.stat().st_size} B, stream acc {acc(pc):.4f}; "
          f"disagreement {float((pe.argmax(1) != pc.argmax(1)).mean()):.4f}")
    for t in (0.6, 0.7, 0.8, 0.9, 0.95, 0.99):
        esc = pe.max(1) < t
        agr = np.where(esc, pc.argmax(1), pe.argmax(1)) == pc.argmax(1)
        print(f"  t={t}: escalation {esc.mean():.4f}, cloud agreement {agr.mean():.4f}")


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["digits", "tabular"], help="regenerate one pair only")
    ap.add_argument("--edge-agent", default="target/debug/edge-agent",
                    help="the edge-agent binary whose `model init` writes the tabular manifests")
    args = ap.parse_args()
    if args.only != "tabular":
        main()
    if args.only != "digits":
        tabular(args.edge_agent)
