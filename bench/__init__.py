"""Benchmarks: accuracy sweep (bench.accuracy), prune cost (bench.cost), inference speed
(bench.speed). Each writes bench/results/<name>.json, .png and .md; `make bench` runs all three."""
