"""Handing edgekit artifacts to existing inference servers.

``repository``: Triton Inference Server and OpenVINO Model Server model repositories
(``edgekit export-repo``). ``triton``: the ``tritonserver`` binary bundled in the
``nvidia-pytriton`` wheel, started on a repository (``edgekit serve``). ``client``: a runner that
talks the Open Inference Protocol, so ``edgekit bench --server`` reuses the local benchmark.
"""
