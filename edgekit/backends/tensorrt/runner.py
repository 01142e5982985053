"""TensorRT runner for ``trt`` artifacts (GPU; untested in this project's environment, see README).

Buffers come from torch's CUDA allocator and the runner's own stream is a ``torch.cuda.Stream``
(torch is there anyway; PyCUDA is not on the offline GPU machine). TensorRT never runs on the legacy
default stream, where ``enqueueV3`` adds synchronisations of its own (TensorRT warns about it); the
runner's stream waits for the caller's current stream before it reads the input, and the caller's
stream waits for it before the output is used. TensorRT >= 8.5: the name-based tensor API (``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``); older: bindings (``execute_async_v2``). One execution
context per optimization profile (batch 1, and 2..max batch). Before deserializing, the manifest's
TensorRT version and GPU are compared with this machine's: an engine built elsewhere is refused with
one line (``edgekit.backends.tensorrt.build.compatibility_problem``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError, MissingBackendError
from edgekit.backends.artifact_runner import ArtifactRunner


def _torch_dtype(trt, torch, dt):
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT8: torch.int8,
             trt.DataType.INT32: torch.int32}
    if dt not in table:
        raise EdgekitError(f"TensorRT tensor type {dt} is not supported by edgekit's runner")
    return table[dt]


class TensorRTRunner(ArtifactRunner):
    name = "trt"

    def __init__(self, folder: Path, device: int = 0, **_):
        super().__init__(folder)
        try:
            import tensorrt as trt
        except ImportError:
            raise MissingBackendError("running TensorRT artifacts", "tensorrt") from None
        import torch

        from edgekit.backends.tensorrt.build import compatibility_problem, describe_environment

        if not torch.cuda.is_available():
            raise EdgekitError(f"{folder}: a TensorRT engine needs a CUDA GPU; none is available here")
        problem = compatibility_problem(self.manifest, describe_environment(device))
        if problem:
            raise EdgekitError(f"{folder}: {problem}")
        self.trt, self.torch = trt, torch
        self.device = torch.device("cuda", device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.model_bytes())  # verified bytes
        if self.engine is None:
            raise EdgekitError(f"{folder}: TensorRT could not deserialize the engine (see its log above)")
        self.named_api = hasattr(self.engine, "num_io_tensors")
        profiles = self.manifest.get("tensorrt", {}).get("profiles") or [{"min": 1, "opt": 1, "max": 1}]
        self.profiles = profiles
        self.contexts = []
        self.stream = torch.cuda.Stream(device=self.device)  # TensorRT's own, not the legacy default stream
        stream = self.stream.cuda_stream
        for i, _p in enumerate(profiles):
            ctx = self.engine.create_execution_context()
            if i and hasattr(ctx, "set_optimization_profile_async"):
                ctx.set_optimization_profile_async(i, stream)
            self.contexts.append(ctx)
        torch.cuda.synchronize(self.device)
        if self.named_api:
            names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
            mode = trt.TensorIOMode.INPUT
            self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
            self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        else:  # TensorRT < 8.5: bindings
            names = [self.engine.get_binding_name(i) for i in range(self.engine.num_bindings)]
            self.inputs = [n for n in names if self.engine.binding_is_input(n)]
            self.outputs = [n for n in names if not self.engine.binding_is_input(n)]
        self.input_name, self.output_name = self.inputs[0], self.outputs[0]

    def _context(self, n: int):
        for i, p in enumerate(self.profiles):
            if p["min"] <= n <= p["max"]:
                return i, self.contexts[i]
        raise EdgekitError(f"{self.source}: batch {n} is outside the engine's profiles "
                           f"(max {max(p['max'] for p in self.profiles)}); rebuild with a larger max batch")

    def infer_device(self, x):
        """Run on a CUDA tensor (N x C x H x W float32) on the runner's own stream, ordered after the
        caller's current stream; returns a CUDA tensor the caller's current stream may use at once."""
        torch = self.torch
        x = x.to(self.device, torch.float32).contiguous()
        n = int(x.shape[0])
        idx, ctx = self._context(n)
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)  # x (and whatever produced it) is complete before TensorRT reads it
        out = self._enqueue(x, idx, ctx, self.stream.cuda_stream)
        x.record_stream(self.stream)  # the allocator must not reuse x / out before TensorRT is done with them
        out.record_stream(self.stream)
        caller.wait_stream(self.stream)
        return out

    def _enqueue(self, x, idx, ctx, stream: int):
        torch, trt = self.torch, self.trt
        if self.named_api:
            ctx.set_input_shape(self.input_name, tuple(x.shape))
            out_shape = tuple(ctx.get_tensor_shape(self.output_name))
            out = torch.empty(out_shape, dtype=_torch_dtype(trt, torch, self.engine.get_tensor_dtype(self.output_name)),
                              device=self.device)
            ctx.set_tensor_address(self.input_name, int(x.data_ptr()))
            ctx.set_tensor_address(self.output_name, int(out.data_ptr()))
            if not ctx.execute_async_v3(stream):
                raise EdgekitError(f"{self.source}: TensorRT execution failed")
        else:
            per_profile = self.engine.num_bindings // max(1, self.engine.num_optimization_profiles)
            i_in = self.engine.get_binding_index(self.input_name) + idx * per_profile
            i_out = self.engine.get_binding_index(self.output_name) + idx * per_profile
            ctx.set_binding_shape(i_in, tuple(x.shape))
            out = torch.empty(tuple(ctx.get_binding_shape(i_out)),
                              dtype=_torch_dtype(trt, torch, self.engine.get_binding_dtype(i_out)), device=self.device)
            bindings = [0] * self.engine.num_bindings
            bindings[i_in], bindings[i_out] = int(x.data_ptr()), int(out.data_ptr())
            if not ctx.execute_async_v2(bindings, stream):
                raise EdgekitError(f"{self.source}: TensorRT execution failed")
        return out

    def close(self) -> None:
        self.contexts = []  # execution contexts before the engine they were made from
        self.engine = None
        super().close()

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        x = self.torch.from_numpy(batch).to(self.device, non_blocking=False)
        out = self.infer_device(x)
        return out.float().cpu().numpy()  # .cpu() synchronizes the stream
