"""Benchmarks: the latency client, the server-overhead benchmark and the GPU pipeline benchmark."""
