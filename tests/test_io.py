"""save_pruned / load_pruned: a hub-style folder that rebuilds the pruned shapes with identical logits."""

import ast
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_model
from tiny import FAMILIES, model_inputs, tiny_model, tiny_sample
from torch.utils._python_dispatch import TorchDispatchMode

import kprune
from kprune import modeling_kprune
from kprune.arch import FAMILIES as ARCH_FAMILIES
from kprune.arch import family_of
from kprune.io import META_FILE, MODELING_FILE, read_meta
from kprune.models import model_logits
from kprune.sublayer import Sublayer, unit_counts

CASES = [(family, task) for family in FAMILIES for task in ("classification", "qa")]
CASES.append(("bert", "regression"))


def pruned(family: str, task: str):
    model = tiny_model(family, task)
    sample = model_inputs(model, tiny_sample())
    return model, sample, kprune.prune(model, sample, flops_keep=0.3, progress=False)


@pytest.mark.parametrize("family,task", CASES)
def test_round_trip_gives_identical_logits(tmp_path, family, task):
    model, sample, result = pruned(family, task)
    kprune.save_pruned(result.model, tmp_path, record=result.record)
    loaded = kprune.load_pruned(tmp_path)
    assert isinstance(loaded, type(model)) and family_of(loaded) is family_of(model)
    assert not loaded.training
    assert unit_counts(loaded) == unit_counts(result.model)
    assert torch.equal(model_logits(loaded, sample), model_logits(result.model, sample))
    meta = read_meta(tmp_path)
    assert meta["version"] == 2
    assert meta["record"]["heads"] == result.record.heads
    assert meta["record"]["config"]["flops_keep"] == 0.3


@pytest.mark.parametrize("family,task", [("bert", "classification"), ("distilbert", "qa")])
def test_folder_is_a_custom_code_model_repository(tmp_path, family, task):
    _, _, result = pruned(family, task)
    kprune.save_pruned(result.model, tmp_path, record=result.record)
    config = json.loads((tmp_path / "config.json").read_text())
    heads, neurons = unit_counts(result.model)
    assert config["model_type"] == f"kprune-{family}"  # not a stock type: no silent stock load
    assert (config["heads_per_layer"], config["neurons_per_layer"]) == (heads, neurons)
    auto_class = "AutoModelForQuestionAnswering" if task == "qa" else "AutoModelForSequenceClassification"
    module, model_class = config["auto_map"][auto_class].split(".")
    assert config["architectures"] == [model_class]
    assert (tmp_path / f"{module}.py").read_text() == Path(modeling_kprune.__file__).read_text()
    assert config["auto_map"]["AutoConfig"].split(".")[0] == module
    assert {"model.safetensors", "README.md", META_FILE} <= {path.name for path in tmp_path.iterdir()}


@pytest.mark.parametrize("family,task", [("roberta", "classification"), ("electra", "qa")])
def test_save_pretrained_of_a_loaded_model_writes_a_loadable_folder(tmp_path, family, task):
    _, sample, result = pruned(family, task)
    kprune.save_pruned(result.model, tmp_path / "pruned")
    kprune.load_pruned(tmp_path / "pruned").save_pretrained(tmp_path / "resaved")
    config = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert config["model_type"] == f"kprune-{family}" and len(config["auto_map"]) == 2
    assert (tmp_path / "resaved" / MODELING_FILE).read_text() == Path(modeling_kprune.__file__).read_text()
    reloaded = kprune.load_pruned(tmp_path / "resaved")  # no kprune.json: the config says it all
    assert torch.equal(model_logits(reloaded, sample), model_logits(result.model, sample))


def test_modeling_file_imports_only_torch_and_transformers():
    tree = ast.parse(Path(modeling_kprune.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported == {"__future__", "dataclasses", "torch", "transformers"}


@pytest.mark.parametrize("family", sorted(ARCH_FAMILIES))
def test_modeling_layouts_match_the_adapter_table(family):
    """The in-folder file repeats the module paths of kprune.arch (it cannot import kprune): same paths."""
    adapter, layout = ARCH_FAMILIES[family], modeling_kprune.LAYOUTS[family]
    assert layout.layers == adapter.layers and layout.self_attention == adapter.self_attention
    assert layout.attention_inputs == (adapter.query, adapter.key, adapter.value)
    assert (layout.attention_output, layout.ffn_up, layout.ffn_down) == (
        adapter.attention_output,
        adapter.ffn_up,
        adapter.ffn_down,
    )


def test_layer_without_heads_round_trips(tmp_path):
    model = tiny_model("bert")
    Sublayer(model, 2).keep_units(torch.zeros(4, dtype=torch.bool))
    kprune.save_pruned(model, tmp_path)
    loaded = kprune.load_pruned(tmp_path)
    assert unit_counts(loaded) == ([4, 0], [24, 24])
    sample = tiny_sample()
    assert torch.equal(model_logits(loaded, sample), model_logits(model, sample))


class CreatedShapes(TorchDispatchMode):
    """Records the shape of every tensor an operation creates off the meta device."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                self.shapes.add(tuple(tensor.shape))
        return out


def test_loading_never_builds_the_unpruned_layers(tmp_path):
    model = tiny_model("bert")  # hidden 16, 24 FFN neurons per layer
    for index, keep in ((1, 10), (3, 5)):
        Sublayer(model, index).keep_units(torch.arange(24) < keep)
    kprune.save_pruned(model, tmp_path)
    with CreatedShapes() as created:
        loaded = kprune.load_pruned(tmp_path)
    assert unit_counts(loaded) == ([4, 4], [10, 5])
    full_size = {(24, 16), (16, 24), (24,)}  # an unpruned FFN map
    assert not full_size & created.shapes
    with CreatedShapes() as control:  # the check sees a full-size build
        type(model)(model.config)
    assert full_size <= control.shapes


def save_version_1(model, directory: Path) -> None:
    """The format-1 writer as it was: the unpruned config, pruned.safetensors, counts in kprune.json."""
    directory.mkdir(parents=True, exist_ok=True)
    heads, neurons = unit_counts(model)
    meta = {
        "format": "kprune-pruned-model",
        "version": 1,
        "architecture": type(model).__name__,
        "heads_per_layer": heads,
        "neurons_per_layer": neurons,
        "record": None,
    }
    model.config.save_pretrained(directory)
    save_model(model, str(directory / "pruned.safetensors"))
    (directory / META_FILE).write_text(json.dumps(meta, indent=1))


@pytest.mark.parametrize("family,task", [("bert", "classification"), ("distilbert", "qa")])
def test_version_1_folders_still_load(tmp_path, family, task):
    _, sample, result = pruned(family, task)
    save_version_1(result.model, tmp_path)
    assert not (tmp_path / MODELING_FILE).exists()
    with CreatedShapes() as created:
        loaded = kprune.load_pruned(tmp_path)
    assert not {(24, 16), (16, 24)} & created.shapes
    assert isinstance(loaded, getattr(transformers, type(result.model).__name__))
    assert unit_counts(loaded) == unit_counts(result.model)
    assert torch.equal(model_logits(loaded, sample), model_logits(result.model, sample))


def test_loading_something_else_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a kprune pruned-model folder"):
        kprune.load_pruned(tmp_path)
    (tmp_path / META_FILE).write_text(json.dumps({"format": "other", "version": 9}))
    with pytest.raises(ValueError, match="unknown format"):
        kprune.load_pruned(tmp_path)


def test_a_folder_is_replaced_as_a_whole_or_not_at_all(tmp_path):
    from kprune.atomic import _replace_folder, atomic_folder

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_folder(out) as temporary:
        (temporary / "new.txt").write_text("new")
        raise KeyboardInterrupt  # Ctrl-C in the middle of a save
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no sibling left behind
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    with atomic_folder(out) as temporary:
        (temporary / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["new.txt"]  # the old file went with the old folder

    # Where the system cannot swap two folders in one call: the old one is renamed aside first.
    new = tmp_path / "new"
    new.mkdir()
    (new / "newer.txt").write_text("newer")
    _replace_folder(new, out)
    assert [p.name for p in out.iterdir()] == ["newer.txt"]
    assert [p.name for p in new.iterdir()] == ["new.txt"]  # the old folder, for the caller to remove


def test_saving_over_a_previous_model_replaces_it_and_refuses_other_folders(tmp_path):
    first, second = (kprune.prune(tiny_model(), tiny_sample(), keep, progress=False) for keep in (0.6, 0.3))
    kprune.save_pruned(first.model, tmp_path / "out", record=first.record)
    kprune.save_pruned(second.model, tmp_path / "out", record=second.record)
    assert read_meta(tmp_path / "out")["record"]["config"]["flops_keep"] == 0.3
    assert unit_counts(kprune.load_pruned(tmp_path / "out")) == unit_counts(second.model)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="non-empty folder not written by kprune"):
        kprune.save_pruned(first.model, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


@pytest.fixture
def saved(tmp_path):
    result = kprune.prune(tiny_model(), tiny_sample(), 0.5, progress=False)
    return kprune.save_pruned(result.model, tmp_path / "pruned", record=result.record)


def test_truncated_weights_are_one_error_naming_the_file(saved):
    weights = saved / "model.safetensors"
    for size in (weights.stat().st_size // 2, 4):
        weights.write_bytes(weights.read_bytes()[:size])
        with pytest.raises(ValueError, match=f"{weights} is unreadable or truncated .*; prune again"):
            kprune.load_pruned(saved)


@pytest.mark.parametrize("damage", ["a head too many", "a layer too few", "truncated"])
def test_counts_that_do_not_match_the_weights_are_one_error(saved, damage):
    path = saved / (META_FILE if damage == "truncated" else "config.json")  # the counts are in the config
    meta = json.loads(path.read_text())
    if damage == "a head too many":
        meta["heads_per_layer"][0] += 1
    elif damage == "a layer too few":
        meta["heads_per_layer"], meta["neurons_per_layer"] = (
            meta["heads_per_layer"][:1],
            meta["neurons_per_layer"][:1],
        )
    path.write_text(json.dumps(meta)[: None if damage != "truncated" else 40])
    with pytest.raises(ValueError) as error:
        kprune.load_pruned(saved)
    expected = (
        "is damaged (not JSON" if damage == "truncated" else f"does not match {saved / 'model.safetensors'}"
    )
    assert str(path) in str(error.value) and expected in str(error.value)
