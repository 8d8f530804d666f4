"""Fine-tuning the embedded default's teacher: it learns, frozen embeddings stay frozen, and its new head
starts from the teacher's seed."""

import torch
from tiny import tiny_model, tiny_sample

from pipeline.finetune import FinetuneConfig, finetune, model_to_finetune


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


def test_the_new_head_starts_from_the_seed_whatever_the_process_random_state(tmp_path):
    tiny_model("bert", num_labels=2, seed=0).base_model.save_pretrained(tmp_path)  # an encoder, no head

    def head(seed: int, process_state: int) -> torch.Tensor:
        torch.manual_seed(process_state)
        model = model_to_finetune(str(tmp_path), seed, num_labels=3)
        assert torch.initial_seed() == process_state  # the process's random state is left alone
        return model.classifier.weight.detach()

    assert head(seed=0, process_state=1).shape == (3, 16)
    assert torch.equal(head(seed=0, process_state=1), head(seed=0, process_state=2))
    assert not torch.equal(head(seed=0, process_state=1), head(seed=1, process_state=1))
