import sys
from bench import cost
from kprune import memory
memory.MMAP_THRESHOLD_BYTES = int(sys.argv[4])
args = cost.parse_args(["--one", "--model", sys.argv[1], "--method", sys.argv[2], "--num-tokens", sys.argv[3], "--flops-keep", "0.5"])
row = cost._measure_one(args)
print(sys.argv[2], "thr", sys.argv[4], "seconds", round(row["seconds"],1), "peak", round(row["peak_rss_mb"]))
