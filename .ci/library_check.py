"""Run in a fresh venv holding only kprune and its runtime requirements: prune a tiny random BERT,
save it, reload it with kprune and with transformers alone (remote code), and check the pipeline's
stack is absent."""

import importlib.util
import sys
import tempfile

import torch
import transformers

import kprune

absent = [name for name in ("prefect", "dvc", "mlflow") if importlib.util.find_spec(name) is not None]
assert not absent, f"the library alone pulled in {absent}"

torch.manual_seed(0)
config = transformers.BertConfig(
    vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24
)
model = transformers.BertForSequenceClassification(config).eval()
sample = {"input_ids": torch.randint(3, 60, (16, 10)), "attention_mask": torch.ones(16, 10, dtype=torch.long)}
result = kprune.prune(model, sample, flops_keep=0.5, progress=False)
with tempfile.TemporaryDirectory() as folder:
    kprune.save_pruned(result.model, folder, record=result.record)
    with torch.no_grad():
        expected = result.model(**sample).logits
        reloaded = kprune.load_pruned(folder)(**sample).logits
        auto = transformers.AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
        remote = auto.eval()(**sample).logits
assert torch.equal(reloaded, expected) and torch.equal(remote, expected)
kept = 100 * result.record.flops_kept
print(f"library alone ({sys.prefix}): pruned to {kept:.0f}% of the FLOPs, reloaded identically")
