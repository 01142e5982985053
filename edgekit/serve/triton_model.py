"""Triton python-backend model that runs an edgekit artifact through ``edgekit.runtime``.

``edgekit export-repo --format triton`` copies this file to ``REPO/<name>/<version>/model.py`` beside the
artifact folder (``<version>/artifact``). It runs inside Triton's python-backend stub, an embedded
interpreter that ignores ``PYTHONPATH``: the folders listed in ``EDGEKIT_SERVE_PYTHONPATH`` (set by
``edgekit serve``: numpy<2 for the stub, edgekit, the packages of the environment edgekit runs in) are
put in front of ``sys.path`` before edgekit is imported. Elsewhere, install edgekit into the stub's
Python environment.

Dynamic batching hands ``execute`` several requests at once: they are run as one batch.
"""
import json
import os
import sys

for _p in reversed([p for p in os.environ.get("EDGEKIT_SERVE_PYTHONPATH", "").split(os.pathsep) if p]):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        from edgekit import runtime

        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.max_batch = max(1, int(config.get("max_batch_size", 1)))
        folder = os.path.join(args["model_repository"], args["model_version"], "artifact")
        threads = os.environ.get("EDGEKIT_SERVE_THREADS")
        self.runner = runtime.load(folder, threads=int(threads) if threads else None)  # verifies file hashes
        # Runners with static shapes (OpenVINO) compile once per batch size, seconds each: batches are
        # padded to a power of two, and the small ones compiled here rather than on a request's time.
        self.sizes = [1 << k for k in range(self.max_batch.bit_length()) if 1 << k <= self.max_batch]
        if self.sizes[-1] != self.max_batch:
            self.sizes.append(self.max_batch)
        for n in self.sizes[:4]:
            self.runner.warmup(iterations=1, batch=n)

    def execute(self, requests):
        inputs = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        sizes = [x.shape[0] for x in inputs]
        try:
            batch = np.concatenate(inputs, axis=0) if len(inputs) > 1 else inputs[0]
            out = np.concatenate([self._infer_padded(batch[i:i + self.max_batch])
                                  for i in range(0, batch.shape[0], self.max_batch)], axis=0)
        except Exception as e:  # one bad request fails its batch with the reason, not the server
            err = pb_utils.TritonError(f"edgekit: {type(e).__name__}: {e}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=err) for _ in requests]
        responses, start = [], 0
        for n in sizes:
            t = pb_utils.Tensor(self.output_name, np.ascontiguousarray(out[start:start + n], dtype=np.float32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[t]))
            start += n
        return responses

    def _infer_padded(self, batch):
        n = batch.shape[0]
        size = next(s for s in self.sizes if s >= n)
        if size > n:  # zero rows: every image is computed on its own, the padding is dropped
            batch = np.concatenate([batch, np.zeros((size - n, *batch.shape[1:]), batch.dtype)], axis=0)
        return self.runner.infer(batch)[:n]

    def finalize(self):
        self.runner = None
