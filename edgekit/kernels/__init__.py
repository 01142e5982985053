"""Hand-written CUDA kernels (loaded through the optional PyCUDA backend).

Importing this package never needs PyCUDA or a GPU; only :class:`FusedGMBI` and
:func:`load_kernel_module` do, and they raise ``MissingBackendError`` naming the package to install.
"""
from edgekit.kernels.gmbi import (
    FusedGMBI,
    GMBIParams,
    GMBIPlan,
    fold_conv_bn,
    fold_gmbi,
    kernel_source_path,
    load_kernel_module,
    plan_gmbi,
    reference_gmbi,
)

__all__ = [
    "FusedGMBI",
    "GMBIParams",
    "GMBIPlan",
    "fold_conv_bn",
    "fold_gmbi",
    "kernel_source_path",
    "load_kernel_module",
    "plan_gmbi",
    "reference_gmbi",
]
