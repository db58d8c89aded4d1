"""minivmm's benchmarks against the native C baseline (benchmarks/native). Not a kernel
ABI mirror: see benchmarks/run.py and benchmarks/dirty.py."""
