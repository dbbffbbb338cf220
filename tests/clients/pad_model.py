"""Writes a copy of an ONNX model with an unused float initializer of N values appended: the
same model (tract ignores what no node reads), a bigger file. For the rollout fault tests,
which need a download that lasts long enough to be interrupted.

usage: python3 pad_model.py SRC DST N
"""
import sys

import numpy as np
import onnx
from onnx import numpy_helper

src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
m = onnx.load(src)
pad = np.random.default_rng(0).standard_normal(n).astype(np.float32)
m.graph.initializer.append(numpy_helper.from_array(pad, name="tierd_test_padding"))
onnx.save(m, dst)
