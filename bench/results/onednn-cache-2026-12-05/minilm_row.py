"""One MiniLM row of minilm-ab.log: bench.cost's own measurement (configure_cpu_memory, then the prune of
the given method at 100k tokens, budget 0.5), with the mmap threshold of argument 4; the oneDNN cache
capacity comes from the environment, e.g.

    ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024 PYTHONPATH=. \
        python bench/results/onednn-cache-2026-12-05/minilm_row.py teacher kprune 100000 2097152
"""

import sys

from bench import cost
from kprune import memory

memory.MMAP_THRESHOLD_BYTES = int(sys.argv[4])
args = cost.parse_args(
    [
        "--one",
        "--model",
        sys.argv[1],
        "--method",
        sys.argv[2],
        "--num-tokens",
        sys.argv[3],
        "--flops-keep",
        "0.5",
    ]
)
row = cost._measure_one(args)
print(sys.argv[2], "thr", sys.argv[4], "seconds", round(row["seconds"], 1), "peak", round(row["peak_rss_mb"]))
