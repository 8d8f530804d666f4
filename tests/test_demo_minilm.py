"""The embedded demo on the real shipped MiniLM and Rotten Tomatoes data (no network)."""

import pytest
import torch

import kprune
import kprune.demo
from kprune.cli import main
from kprune.data import tokenize
from kprune.models import model_logits
from kprune.rotten_tomatoes import read_rotten_tomatoes, split_by_movie
from kprune.sublayer import unit_counts


def test_rotten_tomatoes_split_by_movie_is_seeded_and_leak_free():
    table = read_rotten_tomatoes()
    assert len(table) == 12_752  # labelled critic sentences after de-duplication
    assert set(table["label"]) == {"fresh", "rotten"}
    train, dev = split_by_movie(table, dev_fraction=0.2, seed=0)
    assert len(train) + len(dev) == len(table)
    train_movies, dev_movies = set(train["movie"]), set(dev["movie"])
    assert not train_movies & dev_movies
    assert len(dev_movies) == round(0.2 * len(train_movies | dev_movies))

    again_train, again_dev = split_by_movie(read_rotten_tomatoes(), dev_fraction=0.2, seed=0)
    assert list(again_train["text"]) == list(train["text"]) and list(again_dev["text"]) == list(dev["text"])
    assert set(split_by_movie(table, dev_fraction=0.2, seed=1)[1]["movie"]) != dev_movies


@pytest.mark.slow
def test_demo_prunes_saves_and_reloads_minilm(tmp_path, monkeypatch, capsys):
    # Run through the command line, keeping the demo function's result to inspect.
    original_run_demo, results = kprune.demo.run_demo, []

    def recording_run_demo(**options):
        results.append(original_run_demo(**options))
        return results[-1]

    monkeypatch.setattr(kprune.demo, "run_demo", recording_run_demo)
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--flops-reduction", "0.5", "--num-sentences", "200", "--quiet"]
    assert main([*argv, "--device", "cpu"]) == 0
    stdout = capsys.readouterr().out
    assert "head is untrained" in stdout and f"saved to {out.resolve()}" in stdout

    (result,) = results
    assert result.record.config["flops_keep"] == 0.5 and result.record.flops_kept <= 0.5
    assert result.record.num_sequences == 200
    heads, neurons = unit_counts(result.model)
    assert sum(heads) < 6 * 12 and sum(neurons) < 6 * 1536  # physically smaller

    reloaded = kprune.load_pruned(out)
    _, dev = split_by_movie(read_rotten_tomatoes())
    tokenizer = kprune.demo.load_minilm_classifier()[1]
    inputs = tokenize(dev.select(range(64)), tokenizer, max_length=64)
    assert torch.equal(model_logits(reloaded, inputs), model_logits(result.model, inputs))
