"""A pruned folder loads with transformers alone: from_pretrained and pipeline with trust_remote_code,
save_pretrained round trips, and a hub id resolved from a local hub cache, in a Python where kprune
cannot be imported; logits identical to kprune.load_pruned."""

import json
import os
import shutil
import subprocess
import sys

import torch
import transformers
from test_io import CASES, pruned
from tiny import tiny_tokenizer

import kprune
from kprune.models import model_logits

HUB_ID = "kprune-tests/tiny-pruned-bert"
TEXTS = ["word1 word2 word3", "word7 word8 word9 word10 word11"]

# Run with `python -I` (no PYTHONPATH, no user site: the worktree is not on the path) and with kprune
# made unimportable, so any use of kprune, direct or through the modeling file, fails.
CHILD = r"""
import json, sys
sys.modules["kprune"] = None
import torch, transformers

cases, hub_id, report_path = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
report = {}
for case in cases:
    folder, qa = case["folder"], case["task"] == "qa"
    head = "QuestionAnswering" if qa else "SequenceClassification"
    auto = getattr(transformers, f"AutoModelFor{head}")
    inputs = torch.load(case["inputs"])

    def logits(model):
        with torch.no_grad():
            out = model(**inputs)
        return torch.stack([out.start_logits, out.end_logits], -1) if qa else out.logits

    model = auto.from_pretrained(folder, trust_remote_code=True).eval()
    model.save_pretrained(case["resaved"])
    resaved = auto.from_pretrained(case["resaved"], trust_remote_code=True).eval()
    from_kprune = auto.from_pretrained(case["kprune_resaved"], trust_remote_code=True).eval()
    outputs = {"logits": logits(model), "resaved": logits(resaved), "kprune_resaved": logits(from_kprune)}
    torch.save(outputs, case["out"])
    report[folder] = {"class": type(model).__name__}
    if not qa:  # transformers 5 has no question-answering pipeline
        pipe = transformers.pipeline("text-classification", model=folder, trust_remote_code=True)
        report[folder]["pipeline"] = pipe(case["texts"])
    try:
        auto.from_pretrained(folder)
    except ValueError as error:
        report[folder]["without_trust"] = str(error)
hub_model = transformers.AutoModelForSequenceClassification.from_pretrained(hub_id, trust_remote_code=True)
report["hub"] = type(hub_model).__name__
report["kprune_imported"] = sys.modules["kprune"] is not None
open(report_path, "w").write(json.dumps(report))  # stdout holds transformers' trust prompts
"""


def hub_cache(cache, repo_id: str, folder) -> None:
    """Lay ``folder`` out as the hub cache holds a downloaded model repository (what push_to_hub uploads
    is what a download brings back): models--owner--name/snapshots/<commit>/ and refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_transformers_alone_loads_every_family_and_head(tmp_path):
    cases, expected, pipelines = [], {}, {}
    for family, task in CASES:
        model, sample, result = pruned(family, task)
        folder = tmp_path / f"{family}-{task}"
        tokenizer = tiny_tokenizer(tmp_path)
        if family == "distilbert":
            tokenizer.model_input_names = ["input_ids", "attention_mask"]
        kprune.save_pruned(result.model, folder, record=result.record, tokenizer=tokenizer)
        loaded = kprune.load_pruned(folder)
        loaded.save_pretrained(tmp_path / f"{family}-{task}-kprune-resaved")  # kprune's model, saved
        torch.save(sample, tmp_path / f"{family}-{task}.inputs.pt")
        expected[str(folder)] = model_logits(loaded, sample)
        if task != "qa":
            pipe = transformers.pipeline("text-classification", model=loaded, tokenizer=tokenizer)
            pipelines[str(folder)] = pipe(TEXTS)
        cases.append(
            {
                "folder": str(folder),
                "task": task,
                "inputs": str(tmp_path / f"{family}-{task}.inputs.pt"),
                "out": str(tmp_path / f"{family}-{task}.out.pt"),
                "resaved": str(tmp_path / f"{family}-{task}-resaved"),
                "kprune_resaved": str(tmp_path / f"{family}-{task}-kprune-resaved"),
                "texts": TEXTS,
            }
        )
    hub_cache(tmp_path / "hub", HUB_ID, tmp_path / "bert-classification")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PYTHON", "HF_", "TRANSFORMERS"))
    }
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    completed = subprocess.run(
        [sys.executable, "-I", "-c", CHILD, json.dumps(cases), HUB_ID, str(tmp_path / "report.json")],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["kprune_imported"] is False
    assert report["hub"] == "KPrunedBertForSequenceClassification"
    for case in cases:
        folder = case["folder"]
        outputs = torch.load(case["out"])
        assert torch.equal(outputs["logits"], expected[folder]), folder
        assert torch.equal(outputs["resaved"], expected[folder]), folder
        assert torch.equal(outputs["kprune_resaved"], expected[folder]), folder
        assert report[folder]["class"].startswith("KPruned")
        if case["task"] != "qa":
            assert report[folder]["pipeline"] == json.loads(json.dumps(pipelines[folder])), folder
        assert "trust_remote_code=True" in report[folder]["without_trust"]
