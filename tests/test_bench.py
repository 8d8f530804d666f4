"""Smoke test of the benchmark scripts (bench/): each main() on a tiny random model and tiny prepared data
writes its JSON, PNG and markdown with the expected keys. No data/teacher, no real model."""

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
from tiny import sentences, tiny_model, tiny_sample, tiny_tokenizer

from kprune.arch import CLASSIFICATION
from kprune.memory import current_rss_mb
from kprune.squad import MAX_QUESTION_TOKENS, STRIDE
from kprune.tasks import custom_task

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not an installed package

from bench import accuracy, cost, speed  # noqa: E402
from bench.common import METHODS, PeakTracer, _option_value, config_method, sample_rows  # noqa: E402
from pipeline.store import write_dataset, write_json, write_table  # noqa: E402


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A teacher folder and a prepared folder laid out as the pipeline's prepare stage writes it."""
    root = tmp_path_factory.mktemp("bench")
    teacher, prepared = root / "teacher", root / "prepared"
    tiny_model("bert", num_labels=2).save_pretrained(teacher)
    tiny_tokenizer(root).save_pretrained(teacher)
    generator = torch.Generator().manual_seed(0)
    train = tiny_sample(num=48, max_len=12, seed=0)
    train["label"] = torch.randint(0, 2, (48,), generator=generator)
    write_table(prepared / "train", train)
    dev = {"text": sentences(20, seed=1), "label": torch.randint(0, 2, (20,), generator=generator).tolist()}
    write_dataset(prepared / "dev_examples" / "validation", datasets.Dataset.from_dict(dev))
    write_json(prepared / "task.json", dataclasses.asdict(custom_task(CLASSIFICATION)))
    window = {"max_length": 12, "stride": STRIDE, "max_question_tokens": MAX_QUESTION_TOKENS}
    write_json(prepared / "info.json", {"tokenizer": str(teacher), **window})
    return root


def common_args(root: Path) -> list[str]:
    folders = {"--teacher": root / "teacher", "--prepared": root / "prepared", "--out": root / "out"}
    return [part for option, folder in folders.items() for part in (option, str(folder))]


def written(root: Path, name: str) -> dict:
    for suffix in ("png", "md"):
        assert (root / "out" / f"{name}.{suffix}").stat().st_size > 0
    return json.loads((root / "out" / f"{name}.json").read_text())


def test_sample_rows_grow_by_prefix():
    mask = tiny_sample(num=40, seed=3)["attention_mask"]
    small, large = sample_rows(mask, 60, 0), sample_rows(mask, 150, 0)
    assert set(small) < set(large)
    assert int(mask[small].sum()) >= 60 and int(mask[large].sum()) >= 150


def test_accuracy_resume_keeps_finished_runs_and_refuses_other_settings(workspace, tmp_path):
    shutil.copytree(workspace / "teacher", tmp_path / "teacher")  # its own teacher and --out
    args = [*common_args(workspace)[:-1], str(tmp_path), "--sample-tokens", "150"]
    args[args.index("--teacher") + 1] = str(tmp_path / "teacher")
    first = accuracy.main(args + ["--methods", "kprune,kwon", "--budgets", "0.5"])
    head = {run["method"]: run["head_tuning"] for run in first["runs"]}  # the run says what its head got
    assert set(head["kprune"]) >= {"strength", "check_error_before", "check_error_after"}
    assert head["kwon"] is None
    report = (tmp_path / "accuracy.md").read_text()
    for suffix in ("md", "png"):
        (tmp_path / f"accuracy.{suffix}").unlink()
    saved = json.loads((tmp_path / "accuracy.json").read_text())
    assert accuracy.main(args + ["--report-only"]) == saved  # from the JSON alone: nothing pruned
    assert (tmp_path / "accuracy.md").read_text() == report and (tmp_path / "accuracy.png").stat().st_size
    second = accuracy.main(args + ["--methods", "kprune,kwon", "--budgets", "0.5,0.4", "--resume"])
    kept = [run for run in second["runs"] if run["flops_keep"] == 0.5]
    assert kept == json.loads(json.dumps(first["runs"]))  # not pruned again: even their seconds are equal
    assert sorted(run["flops_keep"] for run in second["runs"]) == [0.4, 0.4, 0.5, 0.5]
    summary = second["teachers"][0]["summary"]
    assert [entry for entry in summary if entry["flops_keep"] == 0.5] == first["teachers"][0]["summary"]

    # A smaller plan keeps what it does not run under other_runs, so a later --resume still has it.
    third = accuracy.main(args + ["--methods", "kwon", "--budgets", "0.4", "--resume"])
    kwon = [run for run in second["runs"] if (run["method"], run["flops_keep"]) == ("kwon", 0.4)]
    assert third["runs"] == json.loads(json.dumps(kwon))
    assert len(third["other_runs"]) == 3
    with pytest.raises(SystemExit, match="sample_tokens 150, this run has 120"):
        accuracy.main([*args[:-1], "120", "--methods", "kwon", "--budgets", "0.4", "--resume"])
    # The same folder with another fine-tuning in it is another teacher.
    tiny_model("bert", num_labels=2, seed=1).save_pretrained(tmp_path / "teacher")
    with pytest.raises(SystemExit, match="teacher_digests"):
        accuracy.main(args + ["--methods", "kwon", "--budgets", "0.4", "--resume"])


def test_accuracy_report_only_pools_seeds_pruned_by_separate_invocations(workspace, tmp_path):
    args = [*common_args(workspace)[:-1], str(tmp_path), "--sample-tokens", "150"]
    plan = ["--methods", "kprune,kwon", "--budgets", "0.5"]
    accuracy.main(args + plan + ["--seeds", "0"])
    accuracy.main(args + plan + ["--seeds", "1", "--resume"])  # seed 0 moves to other_runs
    pooled = accuracy.main(args + ["--report-only", "--seeds", "0,1"])
    # The same figures as one invocation over both seeds (which keeps every run: nothing is pruned again).
    together = accuracy.main(args + plan + ["--seeds", "0,1", "--resume"])
    assert pooled["teachers"][0]["summary"] == together["teachers"][0]["summary"]
    assert [entry["seeds"] for entry in pooled["teachers"][0]["summary"]] == [[0, 1], [0, 1]]
    assert "seeds [0, 1]" in (tmp_path / "accuracy.md").read_text()
    with pytest.raises(SystemExit, match=r"no runs of seeds \[2\]"):
        accuracy.main(args + ["--report-only", "--seeds", "1,2"])
    # A JSON of an invocation stopped inside a teacher's runs has no note of that teacher's sample (older
    # versions wrote it at the teacher's end): the report derives it from the settings.
    saved = json.loads((tmp_path / "accuracy.json").read_text())
    saved["teachers"][0].pop("sample_note", None)
    (tmp_path / "accuracy.json").write_text(json.dumps(saved))
    accuracy.main(args + ["--report-only"])
    assert "accuracy" in (tmp_path / "accuracy.md").read_text()


def test_accuracy_merge_pools_parallel_invocations_and_pairs_only_on_shared_seeds(workspace, tmp_path):
    def invocation(out: str, methods: str, seed: int, tokens: int = 150) -> list[str]:
        args = [*common_args(workspace)[:-1], str(tmp_path / out), "--sample-tokens", str(tokens)]
        return args + ["--methods", methods, "--budgets", "0.5", "--seeds", str(seed)]

    accuracy.main(invocation("zero", "kprune,kwon", 0))
    accuracy.main(invocation("one", "kprune,kwon", 1))
    accuracy.main(invocation("two", "kprune", 2))
    report = [*common_args(workspace)[:-1], str(tmp_path / "zero"), "--report-only"]
    merges = [part for out in ("one", "two") for part in ("--merge", str(tmp_path / out / "accuracy.json"))]
    merged = accuracy.main(report + merges)
    summary = {entry["method"]: entry for entry in merged["teachers"][0]["summary"]}
    assert summary["kprune"]["seeds"] == [0, 1, 2] and summary["kwon"]["seeds"] == [0, 1]
    assert "accuracy_minus_kwon" not in summary["kprune"]  # Kwon et al. have no seed 2 to pair with
    table = (tmp_path / "zero" / "accuracy.md").read_text()
    assert "Kwon et al. (Mask-Tuning) (seeds 0, 1) |" in table  # fewer seeds than the others: named
    assert "K-prune (default preset) |" in table

    pooled = accuracy.main(report + ["--seeds", "0,1"])  # from the merged JSON alone
    entry = next(e for e in pooled["teachers"][0]["summary"] if e["method"] == "kprune")
    outcomes = {
        (run["method"], run["seed"]): torch.tensor([flag == "1" for flag in run["correct_rows"]]).double()
        for run in pooled["runs"]
    }
    kprune, kwon = outcomes["kprune", 0] + outcomes["kprune", 1], outcomes["kwon", 0] + outcomes["kwon", 1]
    difference = (kprune - kwon) / 2
    assert entry["seeds"] == [0, 1]
    assert entry["accuracy_minus_kwon"] == pytest.approx(float(difference.mean()))
    kwon_entry = next(e for e in pooled["teachers"][0]["summary"] if e["method"] == "kwon")
    assert kwon_entry["accuracy_minus_kprune"] == pytest.approx(-float(difference.mean()))
    assert kwon_entry["accuracy_minus_kprune_se"] == pytest.approx(entry["accuracy_minus_kwon_se"])
    assert "| method minus the default |" in (tmp_path / "zero" / "accuracy.md").read_text()

    accuracy.main(invocation("other", "kwon", 0, tokens=120))
    with pytest.raises(SystemExit, match="--merge: .* sample_tokens 120"):
        accuracy.main(report + ["--merge", str(tmp_path / "other" / "accuracy.json")])
    with pytest.raises(SystemExit):
        accuracy.main(invocation("zero", "kwon", 0) + ["--merge", str(tmp_path / "one" / "accuracy.json")])


def test_accuracy_merge_takes_a_teacher_fine_tuned_again_only_if_it_scores_alike(workspace, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(workspace / "teacher", teacher)

    def folders(out: str) -> list[str]:
        return [
            "--teacher",
            str(teacher),
            "--prepared",
            str(workspace / "prepared"),
            "--out",
            str(tmp_path / out),
        ]

    def invocation(out: str, methods: str) -> Path:
        plan = ["--sample-tokens", "150", "--budgets", "0.5", "--seeds", "0", "--methods", methods]
        accuracy.main(folders(out) + plan)
        return tmp_path / out / "accuracy.json"

    def edited(path: Path, edit) -> Path:
        payload = json.loads(path.read_text())
        edit(payload)
        copy = path.with_name("edited.json")
        copy.write_text(json.dumps(payload))
        return copy

    def flip_first_row(payload: dict) -> None:
        for run in payload["runs"]:
            run["correct_rows"] = ("0" if run["correct_rows"][0] == "1" else "1") + run["correct_rows"][1:]

    invocation("here", "kprune")
    (teacher / "NOTE.txt").write_text("fine-tuned again on another machine")  # its folder digest changes
    merge = folders("here") + ["--report-only", "--merge"]
    with pytest.raises(SystemExit, match="teacher_digests .*teacher: none of the 0 runs in both"):
        accuracy.main(merge + [str(invocation("alone", "kwon"))])
    there = invocation("there", "kprune,kwon")
    with pytest.raises(SystemExit, match="teacher: none of the 1 runs in both scores every row alike"):
        accuracy.main(merge + [str(edited(there, flip_first_row))])

    def other_score(payload: dict) -> None:
        payload["teachers"][0]["teacher"]["scored"]["accuracy"] += 0.01

    with pytest.raises(SystemExit, match="teacher scores .* there, .* here"):
        accuracy.main(merge + [str(edited(there, other_score))])
    merged = accuracy.main(merge + [str(there)])
    assert {run["method"] for run in [*merged["runs"], *merged["other_runs"]]} == {"kprune", "kwon"}


def test_accuracy_speed_cost_write_their_results(workspace):
    args = common_args(workspace)
    methods = "kprune,kwon,magnitude"
    result = accuracy.main(args + ["--budgets", "0.5", "--methods", methods, "--sample-tokens", "150"])
    saved = written(workspace, "accuracy")
    assert saved["runs"] == json.loads(json.dumps(result["runs"]))
    assert {run["method"] for run in saved["runs"]} == set(methods.split(","))
    for run in saved["runs"]:
        assert {"accuracy", "drop_points", "flops_kept", "seconds", "heads_per_layer"} <= set(run)
        assert run["flops_kept"] <= run["flops_keep"] + 1e-6
    assert {"cpu", "cores", "torch_threads"} <= set(saved["machine"])
    assert {"kprune_lead_over_kwon_points", "kprune_drop_at_0.5_points"} <= set(saved["targets"])

    # 0.5 comes from the accuracy sweep's shapes, 0.4 is pruned by the script itself.
    shapes = "--batch-sizes 1,32 --seq-lens 8 --repeats 2 --warmup 1"
    speed.main(args + f"--budgets 0.5,0.4 {shapes} --sample-tokens 100".split())
    saved = written(workspace, "speed")
    sources = [model["source"] for model in saved["models"]]
    assert sources[1].startswith("structure") and sources[2].startswith("pruned here")
    assert len(saved["rows"]) == 3 * 2 * 2  # models x runtimes x batch sizes
    for row in saved["rows"]:
        assert {"median_seconds", "sequences_per_second", "speedup", "fraction_of_ideal"} <= set(row)
    onnxruntime_rows = [row for row in saved["rows"] if row["runtime"] == "onnxruntime"]
    assert {(row["model"], row["batch_size"]) for row in onnxruntime_rows} == {
        (model["name"], batch) for model in saved["models"] for batch in (1, 32)
    }
    assert all(row["speedup_over_torch"] > 0 for row in onnxruntime_rows)
    assert saved["targets"]["min_fraction_of_ideal_at_batch_32"] is not None

    plan = "--bert-base-plan kprune:60,kprune:120 --budgets 0.3 --no-pipeline"
    cost.main(args + f"--tokens 60,120 --methods kprune,kwon --inline --bert-shape 1,16,4,24 {plan}".split())
    saved = written(workspace, "cost")
    assert len(saved["runs"]) == 2 * 2 + 1 + 2
    for run in saved["runs"]:
        assert {"seconds", "peak_rss_mb", "rss_loaded_mb", "sample_tokens", "flops_kept"} <= set(run)
    assert [run["flops_keep"] for run in saved["runs"] if run["model"] == "teacher"] == [0.5] * 4 + [0.3]
    assert set(saved["scaling"]) == {"kprune", "kwon"}
    targets = saved["targets"]
    assert set(targets["teacher_every_budget"]["budgets"]) == {"0.5", "0.3"}
    assert {"versus_kwon_teacher_120", "kprune_linear_in_tokens"} <= set(targets)
    assert all(isinstance(target["met"], bool) for target in targets.values())


def test_cost_child_mode_writes_one_measurement(workspace, tmp_path):
    result = tmp_path / "one.json"
    one = ["--one", "--method", "magnitude", "--num-tokens", "50", "--result", str(result)]
    cost.main(common_args(workspace) + one)
    measured = json.loads(result.read_text())
    assert measured["method"] == "magnitude" and measured["peak_rss_mb"] >= measured["rss_loaded_mb"] > 0


@pytest.mark.parametrize("method, lets_go", [("kprune", True), ("magnitude", False)])
def test_a_cost_row_lets_its_teacher_go_only_with_a_method_that_can(
    method, lets_go, workspace, tmp_path, monkeypatch
):
    """Each row loads its teacher for itself: K-prune is told it may let it go (keep_teacher=False)."""
    options = {}

    def recording(run):
        def recorded(*args, **given):
            options.update(given)
            return run(*args, **given)

        return recorded

    chosen = METHODS[method]
    monkeypatch.setitem(METHODS, method, dataclasses.replace(chosen, run=recording(chosen.run)))
    one = ["--one", "--method", method, "--num-tokens", "50", "--result", str(tmp_path / "one.json")]
    cost.main(common_args(workspace) + one)
    assert chosen.lets_teacher_go == lets_go
    assert options == ({"keep_teacher": False} if lets_go else {})
    assert config_method("lam_rep=0.5")[1].lets_teacher_go


def hold_a_large_tensor(megabytes: int, seconds: float) -> float:
    held = torch.ones(megabytes * 2**20 // 4)  # written, so resident
    time.sleep(seconds)
    return float(held[-1])


def test_peak_tracer_finds_the_function_that_holds_the_peak():
    baseline = current_rss_mb()
    with PeakTracer(interval=0.005) as tracer:
        torch.ones(2**20).sum()  # a small, short allocation before the large one
        hold_a_large_tensor(200, seconds=0.3)
    peak = tracer.records[-1]
    assert peak["rss_mb"] >= baseline + 150
    assert peak["stack"][-1].split()[-1] == "hold_a_large_tensor"  # the innermost Python frame
    rss = [record["rss_mb"] for record in tracer.records]
    assert rss == sorted(rss) and len(set(rss)) == len(rss)


def test_cost_child_mode_traces_the_peak_on_request(workspace, tmp_path):
    result = tmp_path / "one.json"
    one = ["--one", "--method", "magnitude", "--num-tokens", "50", "--result", str(result), "--trace-peak"]
    cost.main(common_args(workspace) + one)
    trace = json.loads(result.read_text())["peak_trace"]
    assert 1 <= len(trace) <= cost.TRACE_RECORDS
    assert all(record["stack"] and record["rss_mb"] > 0 for record in trace)


def test_every_method_has_a_label():
    assert all(method.label for method in METHODS.values())


@pytest.mark.parametrize(
    "module, option, unknown, known",
    [("cost", "--methods", "kprune,kwn", "kwon"), ("repro", "--modes", "warm,hot", "cold, warm")],
)
def test_an_unknown_name_in_a_list_option_is_a_usage_error_naming_the_known_ones(
    module, option, unknown, known, capsys
):
    import importlib

    with pytest.raises(SystemExit) as stopped:
        importlib.import_module(f"bench.{module}").parse_args([option, unknown])
    error = capsys.readouterr().err
    assert stopped.value.code == 2
    assert "unknown" in error and unknown.split(",")[1] in error and known in error


def test_a_config_method_reads_numbers_booleans_and_colon_separated_tuples():
    name, method = config_method("tune_strengths=1e-4:0.01:1,tune_head=false,knowledge_tokens=all")
    assert name == "kprune[tune_strengths=1e-4:0.01:1,tune_head=false,knowledge_tokens=all]"
    assert method.label == "K-prune tune_strengths=1e-4:0.01:1,tune_head=false,knowledge_tokens=all"
    assert _option_value("1e-4:0.01:1") == (1e-4, 0.01, 1)
    assert _option_value("25000") == 25000 and _option_value("false") is False
    with pytest.raises(argparse.ArgumentTypeError, match="name=value"):
        config_method("tune_head")


def test_a_sweep_runs_its_configurations_alone_unless_methods_are_named(workspace, tmp_path):
    args = [*common_args(workspace)[:-1], str(tmp_path), "--sample-tokens", "150", "--budgets", "0.5"]
    sweep = ["--config", "lam_rep=1", "--no-ood"]
    alone = accuracy.main(args + sweep)
    assert [run["method"] for run in alone["runs"]] == ["kprune[lam_rep=1]"]
    named = accuracy.main(args + sweep + ["--methods", "kwon"])
    assert [run["method"] for run in named["runs"]] == ["kwon", "kprune[lam_rep=1]"]
    assert accuracy.selected_methods(accuracy.parse_args([])) == list(METHODS)


def test_the_default_is_paired_with_the_paper_preset_and_counted_behind_only_beyond_the_error():
    """Per-row outcomes averaged over the seeds, then paired: at 0.5 kept the default's rows are
    (1, 1, .5, 0) against the paper preset's (1, 1, 1, 1), a difference of -37.5 ± 23.9 points (the
    standard error of (0, 0, -.5, -1)); at 0.2, (1, 0, 0, 0) against (0, 1, 1, 0): -25 ± 47.9, inside."""
    rows = {
        ("kprune", 0.5, 0): [1, 1, 1, 0],
        ("kprune", 0.5, 1): [1, 1, 0, 0],
        ("kprune-paper", 0.5, 0): [1, 1, 1, 1],
        ("kprune-paper", 0.5, 1): [1, 1, 1, 1],
        ("kprune", 0.2, 0): [1, 0, 0, 0],
        ("kprune-paper", 0.2, 0): [0, 1, 1, 0],
        ("kwon", 0.5, 0): [0, 0, 0, 0],  # one seed: no difference to it at 0.5, where kprune has two
    }
    rows = {key: (torch.tensor(values), None) for key, values in rows.items()}
    summary = accuracy.summarise(rows, ["kprune", "kprune-paper", "kwon"], [0.5, 0.2])
    targets = accuracy.check_targets(summary, teacher_accuracy=1.0)
    paired = targets["kprune_minus_kprune-paper_paired_points"]
    assert paired["0.5"] == pytest.approx([-37.5, 100 * (0.6875 / 3) ** 0.5 / 2])
    assert paired["0.2"] == pytest.approx([-25.0, 100 * (2.75 / 3) ** 0.5 / 2])
    assert targets["kprune_behind_kprune-paper_beyond_paired_se_at"] == ["0.5"]
    assert targets["kprune_at_least_paper_everywhere"] is False
    assert "kprune_minus_kwon_paired_points" not in targets
