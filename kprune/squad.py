"""Extractive QA (SQuAD v1.1 / v2.0): sliding windows over long contexts, and the spans back to text.

Preprocessing is the standard one of transformers' ``run_qa.py``: each (question, context) pair is cut
into windows of ``max_length`` tokens (question first, then as much context as fits), consecutive
windows sharing ``stride`` context tokens, with each token's character offsets kept. Questions are
left-stripped and, as in the original BERT SQuAD code, cut to ``max_question_tokens`` so every window
has room for context (the cut is logged and counted).

Postprocessing is the n-best search of ``run_qa.py``, done for all windows at once: the top
``n_best`` start and end positions of each window form candidate spans; a span is valid when both
ends lie in the context, start <= end and it has at most ``max_answer_length`` tokens; its score is
start + end logit; an example's answer is the best valid span over its windows. The null (no-answer)
score is the smallest start + end logit of the first ([CLS]) token over its windows; SQuAD v2
predicts "" when null score - best span score exceeds the no-answer threshold.

    windows = tokenize_windows(questions, contexts, tokenizer)       # 384 tokens, stride 128
    logits = kprune.evaluate.predict(model, windows.inputs, 64, device)   # (windows, S, 2)
    spans = best_spans(windows, logits, contexts)
    answers = spans.answers(no_answer_threshold=0.0)                 # v2; v1: spans.text
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch

from kprune.tasks import MAX_QUESTION_TOKENS, STRIDE

logger = logging.getLogger(__name__)

MAX_LENGTH = 384
N_BEST = 20
MAX_ANSWER_LENGTH = 30


_OFFICIAL_START = re.compile(r'\s*\{\s*"(version|data)"')


def is_official_json(path: str | Path) -> bool:
    """Whether a .json file looks like the official SQuAD layout ``{"version": ..., "data": [articles]}``."""
    with open(path, encoding="utf-8") as file:
        return bool(_OFFICIAL_START.match(file.read(256)))


def read_official_json(path: str | Path) -> datasets.Dataset:
    """The official SQuAD v1.1 / v2.0 file (articles > paragraphs > questions) as one row per question:
    id, title, context, question, answers {"text": [...], "answer_start": [...]}, like the hub's."""
    articles = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
    rows = [
        {
            "id": qa["id"],
            "title": article.get("title", ""),
            "context": paragraph["context"],
            "question": qa["question"],
            "answers": {
                "text": [answer["text"] for answer in qa["answers"]],
                "answer_start": [answer["answer_start"] for answer in qa["answers"]],
            },
        }
        for article in articles
        for paragraph in article["paragraphs"]
        for qa in paragraph["qas"]
    ]
    if not rows:
        raise ValueError(f"{path} holds no questions")
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "title": datasets.Value("string"),
            "context": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answers": {
                "text": datasets.List(datasets.Value("string")),
                "answer_start": datasets.List(datasets.Value("int32")),
            },
        }
    )
    return datasets.Dataset.from_list(rows, features=features)


@dataclass
class QAWindows:
    """Tokenized windows of QA examples, right-padded to one length S.

    inputs: input_ids, attention_mask (and token_type_ids if the tokenizer makes them), (W, S).
    example_index: (W,) the example (row) each window was cut from, ascending.
    offsets: (W, S, 2) character start/end of each token in its context; None if not asked for.
    context_mask: (W, S) True where the token belongs to the context; None if not asked for.
    """

    inputs: dict[str, torch.Tensor]
    example_index: torch.Tensor
    offsets: torch.Tensor | None = None
    context_mask: torch.Tensor | None = None


def check_window_room(tokenizer, max_length: int, stride: int, max_question_tokens: int) -> None:
    """A clear error when a window could hold no more context than the stride (tokenizers panics then)."""
    room = max_length - max_question_tokens - tokenizer.num_special_tokens_to_add(pair=True)
    if stride < 0 or stride >= room:
        raise ValueError(
            f"stride {stride} must be in [0, {room}): a window of max_length {max_length} holds a question "
            f"of up to {max_question_tokens} tokens and {room} context tokens, and consecutive windows "
            f"share stride context tokens"
        )


def prepare_questions(questions: Sequence[str], tokenizer, max_question_tokens: int) -> list[str]:
    """Questions left-stripped (some SQuAD v2 questions start with long runs of spaces) and cut to
    ``max_question_tokens`` tokens; how many were cut is logged."""
    questions = [question.lstrip() for question in questions]
    encoded = tokenizer(
        questions,
        add_special_tokens=False,
        truncation=True,
        max_length=max_question_tokens,
        return_offsets_mapping=True,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    cut = [index for index, encoding in enumerate(encoded.encodings) if encoding.overflowing]
    for index in cut:  # only the (rare) long questions: end the text where its last kept token ends
        questions[index] = questions[index][: encoded["offset_mapping"][index][-1][1]]
    if cut:
        logger.warning(
            "cut %d of %d questions to %d tokens (max_question_tokens)",
            len(cut),
            len(questions),
            max_question_tokens,
        )
    return questions


def _encode(questions, contexts, tokenizer, max_length, stride, max_question_tokens, **options):
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"kprune needs a fast (Rust) tokenizer, got {type(tokenizer).__name__}")
    check_window_room(tokenizer, max_length, stride, max_question_tokens)
    return tokenizer(
        prepare_questions(questions, tokenizer, max_question_tokens),
        list(contexts),
        truncation="only_second",
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        **options,
    )


def tokenize_windows(
    questions: Sequence[str],
    contexts: Sequence[str],
    tokenizer,
    max_length: int = MAX_LENGTH,
    stride: int = STRIDE,
    max_question_tokens: int = MAX_QUESTION_TOKENS,
    with_offsets: bool = True,
) -> QAWindows:
    """The windows of every (question, context) pair; offsets and context mask for postprocessing."""
    if len(questions) == 0:
        raise ValueError("no questions to tokenize")
    encoded = _encode(
        questions,
        contexts,
        tokenizer,
        max_length,
        stride,
        max_question_tokens,
        padding=True,
        return_offsets_mapping=with_offsets,
        return_tensors="pt",
    )
    example_index = encoded.pop("overflow_to_sample_mapping")
    offsets = encoded.pop("offset_mapping") if with_offsets else None
    context_mask = None
    if with_offsets:
        # sequence_ids: None for special and padding tokens, 0 for the question, 1 for the context.
        sequence_ids = np.array([encoding.sequence_ids for encoding in encoded.encodings], dtype=float)
        context_mask = torch.from_numpy(sequence_ids == 1)
    logger.info(
        "%d questions -> %d windows of up to %d tokens", len(questions), len(example_index), max_length
    )
    return QAWindows(dict(encoded), example_index, offsets, context_mask)


def window_lengths(
    questions: Sequence[str],
    contexts: Sequence[str],
    tokenizer,
    max_length: int = MAX_LENGTH,
    stride: int = STRIDE,
    max_question_tokens: int = MAX_QUESTION_TOKENS,
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens of each window, example of each window), without padding: for sampling and lengths."""
    encoded = _encode(
        questions,
        contexts,
        tokenizer,
        max_length,
        stride,
        max_question_tokens,
        return_length=True,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    return np.asarray(encoded["length"]), np.asarray(encoded["overflow_to_sample_mapping"])


@dataclass
class SpanPredictions:
    """Per example: the best valid span's text ("" if none) and null score - best span score."""

    text: list[str]
    null_score_diff: np.ndarray  # +inf where no span is valid

    def answers(self, no_answer_threshold: float = 0.0) -> list[str]:
        """SQuAD v2 answers: "" where the null score beats the best span by more than the threshold."""
        no_answer = self.null_score_diff > no_answer_threshold
        return ["" if null else text for text, null in zip(self.text, no_answer, strict=True)]


def best_spans(
    windows: QAWindows,
    logits: torch.Tensor,
    contexts: Sequence[str],
    n_best: int = N_BEST,
    max_answer_length: int = MAX_ANSWER_LENGTH,
) -> SpanPredictions:
    """The n-best postprocessing of ``run_qa.py`` (see the module docstring) from (W, S, 2) logits."""
    if windows.offsets is None or windows.context_mask is None:
        raise ValueError("the windows were tokenized without offsets (with_offsets=False)")
    num_windows, width = windows.context_mask.shape
    if logits.shape[:2] != (num_windows, width) or logits.shape[-1] != 2:
        raise ValueError(
            f"QA logits must be (windows, length, 2) = ({num_windows}, {width}, 2), got {tuple(logits.shape)}"
        )
    padding = ~windows.inputs["attention_mask"].bool()
    logits = logits.double().masked_fill(padding[..., None], float("-inf"))
    start, end = logits[..., 0], logits[..., 1]
    null_score = (start[:, 0] + end[:, 0]).numpy()

    k = min(n_best, width)
    start_top, start_at = start.topk(k, dim=1)  # (W, k)
    end_top, end_at = end.topk(k, dim=1)
    span_tokens = end_at[:, None, :] - start_at[:, :, None] + 1  # (W, k starts, k ends)
    context = windows.context_mask
    valid = (
        context.gather(1, start_at)[:, :, None]
        & context.gather(1, end_at)[:, None, :]
        & (span_tokens >= 1)
        & (span_tokens <= max_answer_length)
    )
    scores = (start_top[:, :, None] + end_top[:, None, :]).masked_fill(~valid, float("-inf"))
    best = scores.flatten(1).argmax(1)
    window_score = scores.flatten(1).gather(1, best[:, None])[:, 0].numpy()
    window_start = start_at.gather(1, (best // k)[:, None])[:, 0]
    window_end = end_at.gather(1, (best % k)[:, None])[:, 0]
    rows = torch.arange(num_windows)
    char_start = windows.offsets[rows, window_start, 0].numpy()
    char_end = windows.offsets[rows, window_end, 1].numpy()

    # Per example: its best-scoring window (sort by example, then score descending) and smallest null score.
    example = windows.example_index.numpy()
    num_examples = len(contexts)
    order = np.lexsort((-window_score, example))
    best_window = order[np.unique(example[order], return_index=True)[1]]
    if len(best_window) != num_examples:
        raise ValueError(
            f"the windows cover {len(best_window)} examples, but {num_examples} contexts were given"
        )
    example_null = np.full(num_examples, np.inf)
    np.minimum.at(example_null, example, null_score)
    example_score = window_score[best_window]
    texts = [
        contexts[index][char_start[window] : char_end[window]] if np.isfinite(example_score[index]) else ""
        for index, window in enumerate(best_window)
    ]
    return SpanPredictions(texts, example_null - example_score)
