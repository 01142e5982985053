"""Hand-written CUDA kernels (loaded through the optional PyCUDA backend): the fused GMBI module
(``gmbi``) and the whole GMBINet as one planned launch sequence (``gmbinet``, run by the
``cuda-fused`` runtime).

Importing this package never needs PyCUDA or a GPU; only :class:`FusedGMBI`,
:func:`load_kernel_module` and :func:`load_net_module` do, and they raise ``MissingBackendError``
naming the package to install.
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
from edgekit.kernels.gmbinet import FoldedGMBINet, NetPlan, fold_gmbinet, load_net_module, plan_gmbinet

__all__ = [
    "FoldedGMBINet",
    "FusedGMBI",
    "NetPlan",
    "fold_gmbinet",
    "load_net_module",
    "plan_gmbinet",
    "GMBIParams",
    "GMBIPlan",
    "fold_conv_bn",
    "fold_gmbi",
    "kernel_source_path",
    "load_kernel_module",
    "plan_gmbi",
    "reference_gmbi",
]
