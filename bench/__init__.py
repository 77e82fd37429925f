"""Benchmarks of a running headswap server against its peers (plain ONNX Runtime, sentence-transformers).

Each script starts its own server on a free loopback port, measures, stops it, and can write its section of
docs/BENCHMARKS.md. Shared helpers live in `bench.common`
(percentiles, the machine, docs sections), `bench.data` (data sets, workloads), `bench.serving` (the server
under test, /proc accounting) and `bench.run_k6` (k6 summaries); they are unit-tested in
tests/unit/test_bench_*.py. The large benchmarks keep their CLI in `bench/<name>.py` and their workload and
report in `bench/_<name>_*.py`.
"""
