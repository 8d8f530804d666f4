"""kprune.prune on random tiny configurations (hypothesis), and its determinism across fresh processes."""

import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import transformers
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tiny import VOCAB, model_inputs, tiny_sample

import kprune
from kprune.arch import FAMILIES, QUESTION_ANSWERING, REGRESSION, task_of
from kprune.models import model_logits
from kprune.sublayer import unit_counts

TASKS = ["classification", REGRESSION, QUESTION_ANSWERING]


def random_model(family: str, layers: int, heads: int, head_dim: int, ffn: int, task: str, labels: int):
    """A randomly initialised model of ``family`` with these sizes and task head, in eval mode."""
    if family == "distilbert":
        sizes = dict(dim=heads * head_dim, n_layers=layers, n_heads=heads, hidden_dim=ffn, dropout=0.0)
        sizes.update(attention_dropout=0.0, seq_classif_dropout=0.0, qa_dropout=0.0)
    else:
        sizes = dict(hidden_size=heads * head_dim, num_hidden_layers=layers, num_attention_heads=heads)
        sizes.update(intermediate_size=ffn, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        sizes.update(pad_token_id=1)
    config = transformers.AutoConfig.for_model(
        family, vocab_size=VOCAB, max_position_embeddings=64, num_labels=labels, **sizes
    )
    if task == REGRESSION:
        config.num_labels, config.problem_type = 1, "regression"
    elif task == QUESTION_ANSWERING:
        config.num_labels = 2  # start and end logits
    head = (
        transformers.AutoModelForQuestionAnswering
        if task == QUESTION_ANSWERING
        else transformers.AutoModelForSequenceClassification
    )
    torch.manual_seed(0)
    model = head.from_config(config).eval()
    with torch.no_grad():  # wider than the default init, so units differ in importance
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.3)
    return model


@settings(
    max_examples=30,
    deadline=timedelta(
        seconds=60
    ),  # a tiny prune takes well under a second; the margin is for a busy machine
    derandomize=True,  # the same examples on every run: a failure reproduces
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    family=st.sampled_from(sorted(FAMILIES)),
    layers=st.integers(1, 3),
    heads=st.integers(1, 4),
    head_dim=st.integers(1, 6),
    ffn=st.integers(1, 20),
    task=st.sampled_from(TASKS),
    labels=st.integers(2, 4),
    flops_keep=st.floats(1e-4, 1.0),
    num=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
# a one-wide hidden state: the tuned head's weight was a view of its [weight | bias] (found on another CPU)
@example(
    family="bert",
    layers=1,
    heads=1,
    head_dim=1,
    ffn=1,
    task="classification",
    labels=2,
    flops_keep=1.0,
    num=1,
    seed=0,
)
def test_prune_never_raises_keeps_the_budget_and_the_result_reloads(
    family, layers, heads, head_dim, ffn, task, labels, flops_keep, num, seed
):
    model = random_model(family, layers, heads, head_dim, ffn, task, labels)
    sample = model_inputs(model, tiny_sample(num=num, max_len=10, seed=seed))
    result = kprune.prune(model, sample, flops_keep, device="cpu", progress=False, seed=seed)

    record = result.record
    assert record.flops_final <= record.budget_flops * (1 + 1e-9)
    assert task_of(result.model) == task_of(model) and record.num_sequences == num
    with tempfile.TemporaryDirectory() as folder:
        kprune.save_pruned(result.model, Path(folder) / "pruned", record=record)
        reloaded = kprune.load_pruned(Path(folder) / "pruned")
    assert unit_counts(reloaded) == unit_counts(result.model)
    logits = model_logits(reloaded, sample)
    assert torch.isfinite(logits).all()
    # The state dicts are equal, but from_pretrained leaves the loaded weights at the file's offsets (not
    # 64-byte aligned), and on some CPUs MKL's small matrix products round such operands differently in
    # the last bit (seen: 6e-8 in the pooler of a one-layer BERT); a wrong weight would differ by far more.
    torch.testing.assert_close(logits, model_logits(result.model, sample), rtol=1e-5, atol=1e-6)


DETERMINISM_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[2])
import torch
from tiny import tiny_model, tiny_sample
import kprune
sample = tiny_sample(num=32, seed=7)
result = kprune.prune(tiny_model("bert"), sample, 0.4, device="cpu", progress=False, seed=3)
kprune.save_pruned(result.model, sys.argv[1], record=result.record)
"""


def test_two_fresh_processes_write_bit_identical_weights(tmp_path):
    tests = str(Path(__file__).parent)
    for name in ("first", "second"):  # each process has its own hash seed and allocator state
        command = [sys.executable, "-c", DETERMINISM_SCRIPT, str(tmp_path / name), tests]
        subprocess.run(command, check=True, capture_output=True)
    first, second = ((tmp_path / name / "model.safetensors").read_bytes() for name in ("first", "second"))
    assert first == second
    assert kprune.load_pruned(tmp_path / "first").config.num_hidden_layers == 2
