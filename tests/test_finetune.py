"""Fine-tuning the embedded default's teacher: it learns, and frozen embeddings stay frozen."""

import torch
from tiny import tiny_model, tiny_sample

from pipeline.finetune import FinetuneConfig, finetune


def test_finetune_learns_a_separable_task_and_keeps_embeddings_frozen():
    model = tiny_model("bert", num_labels=2, seed=0)
    inputs = tiny_sample(num=64, max_len=10, seed=1, pair=False)
    labels = (inputs["input_ids"][:, 0] % 2 == 0).long()  # decided by the first token
    embeddings = {name: value.clone() for name, value in model.base_model.embeddings.state_dict().items()}

    def accuracy():
        with torch.no_grad():
            return float((model(**inputs).logits.argmax(-1) == labels).double().mean())

    before = accuracy()
    config = FinetuneConfig(epochs=30, batch_size=16, learning_rate=3e-3, seed=0)
    losses = finetune(model, inputs, labels, config, torch.device("cpu"), progress=False)
    assert len(losses) == 30 and losses[-1] < 0.5 * losses[0]
    assert accuracy() > max(before, 0.9)
    for name, value in model.base_model.embeddings.state_dict().items():
        assert torch.equal(value, embeddings[name])
    assert not model.training
