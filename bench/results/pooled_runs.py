"""Pool bench.accuracy runs of two machines by hand (written when `--report-only --merge` refused a teacher
fine-tuned again; it now takes one that scores alike, and gives the same accuracies) and print, per
budget 0.6 .. 0.2 kept, the mean accuracy over seeds 0 and 1, the out-of-domain agreement, and what the
bench's report does not give: the paired difference to the default on the same dev rows (each row's
outcome averaged over the seeds) +- its standard error. The runs of FOLDER's */accuracy.json win over
OLDER's for the same method, budget and seed; first it prints, for every run of the default both hold,
whether their dev rows' outcomes are the same.

    PYTHONPATH=. python bench/results/pooled_runs.py OLDER_JSON FOLDER METHOD [METHOD ...]
    PYTHONPATH=. python bench/results/pooled_runs.py bench/results/tweets100k-loo-2026-12-05/accuracy.json \\
        bench/results/tweets100k-loo-2026-12-05d kprune-raw-scales kprune-no-head
"""

import json
import sys
from pathlib import Path

from bench.accuracy import mean_and_error, row_outcomes

BUDGETS = [0.6, 0.5, 0.4, 0.3, 0.2]
DEFAULT = "kprune"


def runs_of(path: Path) -> dict[tuple, dict]:
    payload = json.loads(path.read_text())
    return {
        (run["method"], run["flops_keep"], run["seed"]): run
        for run in [*payload["runs"], *payload.get("other_runs", [])]
        if "error" not in run
    }


def main(older_json: str, folder: str, *methods: str) -> None:
    older = runs_of(Path(older_json))
    newer = {
        key: run
        for path in sorted(Path(folder).glob("*/accuracy.json"))
        for key, run in runs_of(path).items()
    }
    same = [
        f"{b} seed {s}: {older[key]['correct_rows'] == newer[key]['correct_rows']}"
        for b in BUDGETS
        for s in (0, 1)
        if (key := (DEFAULT, b, s)) in older and key in newer
    ]
    print("the default's dev outcomes the same in both:", "; ".join(same) or "no run in both")
    runs = {**older, **newer}

    def seeds_averaged(method, budget):
        return sum(row_outcomes(runs[method, budget, seed])[0].double() for seed in (0, 1)) / 2

    for method in (DEFAULT, *methods):
        accuracy = [50 * (runs[method, b, 0]["accuracy"] + runs[method, b, 1]["accuracy"]) for b in BUDGETS]
        ood = [
            50 * (runs[method, b, 0]["ood_agreement"] + runs[method, b, 1]["ood_agreement"]) for b in BUDGETS
        ]
        line = f"{method}: " + " / ".join(f"{a:.2f}" for a in accuracy) + f"; mean {sum(accuracy) / 5:.2f}"
        line += "; ood " + " / ".join(f"{o:.1f}" for o in ood)
        if method != DEFAULT:
            paired = []
            for b in BUDGETS:
                mean, se = mean_and_error(seeds_averaged(method, b) - seeds_averaged(DEFAULT, b))
                paired.append(f"{100 * mean:+.2f} +- {100 * se:.2f}")
            line += "; minus the default: " + " / ".join(paired)
        print(line)


if __name__ == "__main__":
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
