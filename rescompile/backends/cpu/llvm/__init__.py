"""The CPU backend's micro-kernel library: kernels written as LLVM IR with llvmlite, every size
a run-time argument, compiled for the host's instruction set and cached as object code."""
