"""Throughput of quota against the bare gateway and the usual tools: `python -m benchmarks`."""
