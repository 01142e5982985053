"""``cpu-fused``: GMBINet on edgekit's own fused CPU kernels (C++17, AVX2 / AVX-512, loaded with ctypes).

``build.build_cpu_fused`` writes the artifact (folded weights + one kernel library per ISA level, built
with the system C++ compiler at compile time); ``runner.CpuFusedRunner`` runs it.  The kernels follow the
GPU path's plan (``edgekit.kernels.gmbinet.plan_gmbinet``); see ``kernels/README.md``.
"""
