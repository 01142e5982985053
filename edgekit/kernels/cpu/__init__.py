"""The fused CPU kernels (``cpu-fused``): ``gmbinet_cpu.cpp`` (package data), :mod:`.runtime` (what a device
runs: numpy + ctypes) and :mod:`.build` (what the builder runs: the compiler, the INT8 calibration).
Importing this package imports neither."""
