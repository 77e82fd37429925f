"""Benchmarks of a running headswap server against its peers (plain ONNX Runtime, sentence-transformers).

Each script starts its own server on a free loopback port, measures, stops it, and can write its section of
docs/BENCHMARKS.md. Pure helpers (workloads, percentiles, docs sections, k6 summaries) live in
`bench.common` and `bench.run_k6` and are unit-tested in tests/unit/test_bench_*.py.
"""
