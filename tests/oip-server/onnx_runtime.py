"""An MLServer runtime that serves an ONNX classifier through onnxruntime.

The e2e suites start MLServer (a real Open Inference Protocol v2 server that tierd did not
write) with this runtime to test the relay's OIP backend: `serve.py` writes the model
folder and starts `mlserver start` on it.
"""
import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput


class OnnxClassifier(MLModel):
    async def load(self) -> bool:
        uri = self.settings.parameters.uri
        so = ort.SessionOptions()
        so.intra_op_num_threads = so.inter_op_num_threads = 1
        self._session = ort.InferenceSession(uri, so, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        extra = self.settings.parameters.extra or {}
        self._output = extra.get("output", "probabilities")
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        if len(payload.inputs) != 1:
            raise ValueError(f"expected one input, got {len(payload.inputs)}")
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        (y,) = self._session.run([self._output], {self._input: x})
        y = np.asarray(y, dtype=np.float32)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=[ResponseOutput(name=self._output, shape=list(y.shape), datatype="FP32",
                                    data=y.flatten().tolist())],
        )
