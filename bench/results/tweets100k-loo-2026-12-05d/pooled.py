"""The pooled figures of README.md: these runs (seed 1 of the default and of -3, both seeds of -4) with
seed 0 of the default and of -3 from ../tweets100k-loo-2026-12-05/ (another fine-tuning of the same
teacher recipe whose default runs at seed 1 gave the same masks and dev outcomes as these), per budget:
mean accuracy over the seeds, out-of-domain agreement, and the paired difference to the default on the
same dev rows (each row's outcome averaged over the seeds) +- its standard error.

    python bench/results/tweets100k-loo-2026-12-05d/pooled.py
"""

import json
import math
from pathlib import Path

HERE = Path(__file__).parent
BUDGETS = [0.6, 0.5, 0.4, 0.3, 0.2]
runs = {}
for path in [HERE.parent / "tweets100k-loo-2026-12-05/accuracy.json", *sorted(HERE.glob("*/accuracy.json"))]:
    payload = json.loads(path.read_text())
    for run in [*payload["runs"], *payload.get("other_runs", [])]:
        runs[run["method"], run["flops_keep"], run["seed"]] = run  # these folders' runs come last and win


def outcomes(method, budget, seed):
    return [flag == "1" for flag in runs[method, budget, seed]["correct_rows"]]


for method in ("kprune", "kprune-raw-scales", "kprune-no-head"):
    accuracy = [50 * (runs[method, b, 0]["accuracy"] + runs[method, b, 1]["accuracy"]) for b in BUDGETS]
    ood = [50 * (runs[method, b, 0]["ood_agreement"] + runs[method, b, 1]["ood_agreement"]) for b in BUDGETS]
    line = f"{method}: " + " / ".join(f"{a:.2f}" for a in accuracy) + f"; mean {sum(accuracy) / 5:.2f}; ood "
    line += " / ".join(f"{o:.1f}" for o in ood)
    if method != "kprune":
        paired = []
        for b in BUDGETS:
            rows = zip(*(outcomes(m, b, s) for m in (method, "kprune") for s in (0, 1)), strict=True)
            d = [(m0 + m1 - k0 - k1) / 2 for m0, m1, k0, k1 in rows]
            mean = sum(d) / len(d)
            se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
            paired.append(f"{100 * mean:+.2f} +- {100 * se:.2f}")
        line += "; minus the default: " + " / ".join(paired)
    print(line)
