"""Native CPU kernels: the CPU probe, the build of the C++ extensions, and the linear kernels behind one dispatch."""
