"""Benchmarks: training throughput, MFU and the framework's overhead over a bare PyTorch loop."""
