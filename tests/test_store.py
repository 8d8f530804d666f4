"""The pipeline's storage: per-token tensors in Arrow, tokenized tables, atomic writes, fingerprints."""

import pytest
import torch

from pipeline import store


def padded_batches():
    generator = torch.Generator().manual_seed(0)
    masks = [torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]), torch.tensor([[1, 1, 1, 1, 1]])]
    batches = [torch.randn(*mask.shape, 3, generator=generator) for mask in masks]
    return batches, masks


def test_tokens_round_trip_keeps_real_tokens_and_zeroes_padding(tmp_path):
    batches, masks = padded_batches()
    rows = store.write_tokens(tmp_path / "t.arrow", batches, masks, {"fingerprint": "abc"})
    assert rows == 10
    assert store.token_metadata(tmp_path / "t.arrow")["fingerprint"] == "abc"
    for original, read, mask in zip(
        batches, store.read_tokens(tmp_path / "t.arrow", masks), masks, strict=True
    ):
        valid = mask.bool()
        assert torch.equal(read[valid], original[valid])  # bit-exact float32
        assert torch.equal(read[~valid], torch.zeros_like(read[~valid]))


def test_tokens_of_row_tensors_and_of_other_shapes(tmp_path):
    logits = [torch.randn(2, 5), torch.randn(3, 5)]  # per-row tensors: a mask of ones per row
    masks = [torch.ones(2), torch.ones(3)]
    store.write_tokens(tmp_path / "rows.arrow", logits, masks)
    assert all(
        torch.equal(a, b)
        for a, b in zip(logits, store.read_tokens(tmp_path / "rows.arrow", masks), strict=True)
    )


def test_reading_with_other_batches_is_an_error(tmp_path):
    batches, masks = padded_batches()
    store.write_tokens(tmp_path / "t.arrow", batches, masks)
    with pytest.raises(ValueError, match="holds 10 tokens, the batches 5"):
        store.read_tokens(tmp_path / "t.arrow", masks[:1])
    with pytest.raises(ValueError, match="holds 10 tokens, the batches need more"):
        store.read_tokens(tmp_path / "t.arrow", [*masks, masks[1]])


def test_tokens_read_back_with_batches_cut_otherwise(tmp_path):
    """Written in two batches, read in three: the rows follow the sample order, not the writer's batches."""
    batches, masks = padded_batches()
    store.write_tokens(tmp_path / "t.arrow", batches, masks)
    rows = torch.cat([batch[mask.bool()] for batch, mask in zip(batches, masks, strict=True)])
    other = [torch.tensor([[1, 1, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]), torch.tensor([[1, 0]])]
    read = store.read_tokens(tmp_path / "t.arrow", other)
    assert torch.equal(torch.cat([batch[mask.bool()] for batch, mask in zip(read, other, strict=True)]), rows)


def test_a_failed_write_leaves_neither_file_nor_temporary(tmp_path):
    batches, masks = padded_batches()

    def failing():
        yield batches[0]
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        store.write_tokens(tmp_path / "t.arrow", failing(), masks)
    assert list(tmp_path.iterdir()) == []
    store.write_json(tmp_path / "a.json", {"x": 1})
    with pytest.raises(TypeError), store.atomic_path(tmp_path / "a.json") as temporary:
        temporary.write_text("partial")
        raise TypeError
    assert store.read_json(tmp_path / "a.json") == {"x": 1}
    assert [path.name for path in tmp_path.iterdir()] == ["a.json"]


def test_tables_round_trip(tmp_path):
    columns = {
        "input_ids": torch.arange(12).view(3, 4),
        "label": torch.tensor([0, 1, 0]),
        "score": torch.tensor([0.5, -1.0, 2.25]),
        "cube": torch.arange(24, dtype=torch.int32).view(3, 2, 4),
    }
    store.write_table(tmp_path / "split", columns)
    store.write_table(tmp_path / "split", columns)  # replaces
    read = store.read_table(tmp_path / "split")
    assert set(read) == set(columns)
    assert all(torch.equal(read[name], columns[name]) for name in columns)
    assert all(read[name].dtype == columns[name].dtype for name in columns)
    (tmp_path / "old").mkdir()  # a datasets folder of an older kprune holds no table.arrow
    with pytest.raises(FileNotFoundError, match="dvc repro prepare"):
        store.read_table(tmp_path / "old")


def test_fingerprints_are_stable_and_tell_inputs_apart(tmp_path):
    assert store.fingerprint({"b": 1, "a": 2}, 3) == store.fingerprint({"a": 2, "b": 1}, 3)
    assert store.fingerprint({"a": 2}, 3) != store.fingerprint({"a": 2}, 4)
    (tmp_path / "f").write_text("one")
    before = store.folder_digest(tmp_path)
    (tmp_path / "f").write_text("two")
    assert store.folder_digest(tmp_path) != before


def test_an_iteration_file_is_checked_by_size_and_checksum(tmp_path):
    from pipeline.flows import STEP_FILES, damaged_file, file_check

    for name in STEP_FILES:
        (tmp_path / name).write_bytes(name.encode() * 10)
    checks = {name: file_check(tmp_path / name) for name in STEP_FILES}
    assert damaged_file(tmp_path, checks) is None

    weight = tmp_path / "weight.safetensors"
    intact = weight.read_bytes()
    weight.write_bytes(intact[:-1] + bytes([intact[-1] ^ 1]))  # same size, one bit changed
    assert damaged_file(tmp_path, checks) == (
        "weight.safetensors",
        "does not match its checksum in step.json",
    )
    weight.write_bytes(intact[:7])
    assert damaged_file(tmp_path, checks) == (
        "weight.safetensors",
        f"is 7 bytes, step.json says {len(intact)} (truncated?)",
    )
    (tmp_path / "mask.json").unlink()  # the first damaged file in computing order is named
    assert damaged_file(tmp_path, checks) == ("mask.json", "is missing")
    assert damaged_file(tmp_path, {}) == ("knowledge.safetensors", "is not listed in step.json")


def test_a_folder_is_replaced_as_a_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with store.atomic_folder(target) as folder:
        (folder / "weights").write_text("old")
        (folder / "config").write_text("old")
    with pytest.raises(RuntimeError), store.atomic_folder(target) as folder:
        (folder / "weights").write_text("new")
        raise RuntimeError("killed before the config is written")
    assert {p.name: p.read_text() for p in target.iterdir()} == {"weights": "old", "config": "old"}
    (tmp_path / ".model.leftover.tmp").mkdir()  # a killed write's temporary
    with store.atomic_folder(target) as folder:
        (folder / "weights").write_text("new")
    assert {p.name: p.read_text() for p in target.iterdir()} == {"weights": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
