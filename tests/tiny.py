"""Tiny random encoders with real transformers config classes, and samples for them."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertTokenizerFast,
    DistilBertConfig,
    DistilBertForQuestionAnswering,
    DistilBertForSequenceClassification,
    ElectraConfig,
    ElectraForQuestionAnswering,
    ElectraForSequenceClassification,
    RobertaConfig,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
    XLMRobertaConfig,
    XLMRobertaForQuestionAnswering,
    XLMRobertaForSequenceClassification,
)

VOCAB = 60
FAMILIES = ["bert", "roberta", "xlm-roberta", "distilbert", "electra"]

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=24,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def tiny_model(family: str = "bert", task: str = "classification", num_labels: int = 3, seed: int = 0):
    """A randomly initialised tiny model in eval mode; task is classification, regression or qa."""
    torch.manual_seed(seed)
    labels = 1 if task == "regression" else (2 if task == "qa" else num_labels)
    if family == "distilbert":
        config = DistilBertConfig(
            vocab_size=VOCAB,
            dim=16,
            n_layers=2,
            n_heads=4,
            hidden_dim=24,
            max_position_embeddings=64,
            dropout=0.0,
            attention_dropout=0.0,
            seq_classif_dropout=0.0,
            num_labels=labels,
        )
        model_class = DistilBertForQuestionAnswering if task == "qa" else DistilBertForSequenceClassification
    else:
        config_class, classifier_class, qa_class = {
            "bert": (BertConfig, BertForSequenceClassification, BertForQuestionAnswering),
            "roberta": (RobertaConfig, RobertaForSequenceClassification, RobertaForQuestionAnswering),
            "xlm-roberta": (
                XLMRobertaConfig,
                XLMRobertaForSequenceClassification,
                XLMRobertaForQuestionAnswering,
            ),
            "electra": (ElectraConfig, ElectraForSequenceClassification, ElectraForQuestionAnswering),
        }[family]
        model_class = qa_class if task == "qa" else classifier_class
        extra = {"embedding_size": 12} if family == "electra" else {}  # exercises ELECTRA's input projection
        config = config_class(num_labels=labels, pad_token_id=1, **_COMMON, **extra)
    if task == "regression":
        config.problem_type = "regression"
    model = model_class(config).eval()
    # Random init gives near-identical tiny weights; widen them so units differ in importance.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.3)
    return model


def tiny_sample(
    num: int = 24, max_len: int = 12, seed: int = 0, pair: bool = True
) -> dict[str, torch.Tensor]:
    """Right-padded token ids with varied lengths, like a tokenizer's padded batch."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, max_len + 1, (num,), generator=generator)
    input_ids = torch.randint(3, VOCAB, (num, max_len), generator=generator)
    positions = torch.arange(max_len)
    attention_mask = (positions[None, :] < lengths[:, None]).long()
    input_ids = torch.where(attention_mask.bool(), input_ids, torch.ones_like(input_ids))
    sample = {"input_ids": input_ids, "attention_mask": attention_mask}
    if pair:
        sample["token_type_ids"] = (positions[None, :] >= (lengths[:, None] // 2)).long() * attention_mask
    return sample


def model_inputs(model, sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop token_type_ids for families without segment embeddings."""
    if model.config.model_type == "distilbert":
        return {k: v for k, v in sample.items() if k != "token_type_ids"}
    return sample


SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [f"word{index}" for index in range(40)]  # one token each


def tiny_tokenizer(folder) -> BertTokenizerFast:
    """A BERT WordPiece tokenizer over SPECIAL + WORDS (45 ids, within tiny.VOCAB)."""
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + WORDS) + "\n")
    return BertTokenizerFast(vocab=str(vocab))


def sentences(num: int, seed: int = 0, min_words: int = 1, max_words: int = 12) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_words, max_words + 1, (num,), generator=generator)
    return [
        " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(n),), generator=generator))
        for n in lengths
    ]
