"""A runner for a model behind an inference server (Open Inference Protocol / KServe v2, via tritonclient).

``ServerRunner(url, model).infer(batch)`` behaves like ``runtime.load(artifact).infer(batch)``: float32
``N x C x H x W`` preprocessed images in, ``N x 1 x H x W`` probabilities out, so ``evaluate`` and the
benchmark's timing take it as they take a local runner. The preprocessing spec comes from the model's
config (``parameters.edgekit_preprocess``, written by ``edgekit export-repo``) or from a local artifact.
"""
from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np

from edgekit.data.preprocess import PreprocessSpec
from edgekit.errors import EdgekitError, MissingBackendError, first_line
from edgekit.backends.base import Runner
from edgekit.utils import parse_host_port


def _split_url(url: str):
    protocol, address = "http", url
    if url.startswith("grpc://"):
        protocol, address = "grpc", url[len("grpc://"):]
    elif url.startswith("http://"):
        address = url[len("http://"):]
    elif "://" in url:
        raise EdgekitError(f"--server {url!r}: use HOST:PORT, http://HOST:PORT or grpc://HOST:PORT")
    parse_host_port(address, "--server", example="127.0.0.1:8000")  # the same HOST:PORT rule as every command
    return protocol, address


def _client_module(protocol: str):
    try:
        if protocol == "grpc":
            import tritonclient.grpc as mod
        else:
            import tritonclient.http as mod
    except ImportError:
        raise MissingBackendError(f"talking to an inference server over {protocol}",
                                  f"tritonclient[{protocol}]") from None
    return mod


class ServerRunner(Runner):
    def __init__(self, url: str, model: str, version: str = "", spec_from: Optional[str] = None,
                 timeout_s: float = 30.0):
        self.protocol, self.address = _split_url(url)
        self.name = f"server-{self.protocol}"
        self.model, self.version, self.timeout_s = model, version, timeout_s
        self._mod = _client_module(self.protocol)
        self.client = self._connect()
        meta, config = self._describe()
        self.input_name = meta["inputs"][0]["name"]
        self.output_name = meta["outputs"][0]["name"]
        self.max_batch = int(config.get("max_batch_size", 0)) if config else 0
        params = (config or {}).get("parameters", {})
        if spec_from:
            from edgekit.artifact import read_manifest

            spec = PreprocessSpec.from_dict(read_manifest(spec_from)["preprocess"])
        elif "edgekit_preprocess" in params:
            spec = PreprocessSpec.from_dict(json.loads(params["edgekit_preprocess"]["string_value"]))
        else:
            raise EdgekitError(f"model {model!r} at {url} does not say its preprocessing (not written by edgekit "
                               "export-repo, or the server hides its config): pass --spec-from ARTIFACT")
        super().__init__(spec, Path(f"{self.protocol}://{self.address}/{model}"),
                         {"server": url, "model": model, "config_parameters":
                          {k: v.get("string_value") for k, v in params.items()}})
        target = params.get("edgekit_target", {}).get("string_value", "")
        self.precision = target.split(":", 1)[1] if ":" in target else "fp32"
        self.size_bytes = int(params.get("edgekit_size_bytes", {}).get("string_value", 0) or 0)

    def _connect(self):
        try:
            client = self._mod.InferenceServerClient(self.address, network_timeout=self.timeout_s) \
                if self.protocol == "http" else self._mod.InferenceServerClient(self.address)
            live = client.is_server_live()
        except Exception as e:
            raise EdgekitError(f"no inference server answering at {self.protocol}://{self.address} "
                               f"({first_line(e, 160)})") from None
        if not live:
            raise EdgekitError(f"the inference server at {self.address} is not live")
        return client

    def _describe(self):
        try:
            if not self.client.is_model_ready(self.model, self.version):
                raise EdgekitError(f"model {self.model!r} is not ready on {self.address}")
            if self.protocol == "grpc":
                meta = self.client.get_model_metadata(self.model, self.version, as_json=True)
            else:
                meta = self.client.get_model_metadata(self.model, self.version)
        except EdgekitError:
            raise
        except Exception as e:
            raise EdgekitError(f"model {self.model!r} on {self.address}: {first_line(e)}") from None
        try:  # Triton's extension; OVMS and KServe do not have it (then: --spec-from, no batch limit known)
            if self.protocol == "grpc":
                config = self.client.get_model_config(self.model, self.version, as_json=True).get("config", {})
            else:
                config = self.client.get_model_config(self.model, self.version)
        except Exception:
            config = {}
        return meta, config

    def _request(self, client, batch: np.ndarray) -> np.ndarray:
        inp = self._mod.InferInput(self.input_name, list(batch.shape), "FP32")
        inp.set_data_from_numpy(batch)
        out = self._mod.InferRequestedOutput(self.output_name)
        try:
            res = client.infer(self.model, [inp], model_version=self.version, outputs=[out])
        except Exception as e:
            raise EdgekitError(f"{self.address}/{self.model}: inference failed: {first_line(e)}") from None
        return res.as_numpy(self.output_name)

    def close(self) -> None:
        client, self.client = getattr(self, "client", None), None
        if client is not None and hasattr(client, "close"):  # the connection (HTTP pool / gRPC channel)
            client.close()
        super().close()

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        step = self.max_batch or batch.shape[0]
        return np.concatenate([self._request(self.client, batch[i:i + step])
                               for i in range(0, batch.shape[0], step)], axis=0)

    def throughput_queue(self, batch: int, jobs: int):
        """``jobs`` requests in flight, one client connection each (what the benchmark's async column uses)."""
        return _RequestQueue(self, jobs)

    def describe(self) -> str:
        return f"{self.model} on {self.protocol}://{self.address}"


class _RequestQueue:
    """The ``start_async`` / ``wait_all`` interface of OpenVINO's AsyncInferQueue, over server requests.

    One worker thread and one client connection per request in flight; each client is made in its own
    thread (tritonclient's HTTP client runs on gevent, whose hub belongs to the thread that made it).
    """

    def __init__(self, runner: ServerRunner, jobs: int):
        self.runner = runner
        self.local = threading.local()
        self.pool = ThreadPoolExecutor(jobs)
        self.pending = []

    def _call(self, batch: np.ndarray):
        if not hasattr(self.local, "client"):
            self.local.client = self.runner._connect()
        return self.runner._request(self.local.client, batch)

    def start_async(self, inputs: dict):
        self.pending.append(self.pool.submit(self._call, np.ascontiguousarray(inputs[0])))

    def wait_all(self):
        done, self.pending = self.pending, []
        for f in done:
            f.result()

    def __del__(self):
        self.pool.shutdown(wait=False)
