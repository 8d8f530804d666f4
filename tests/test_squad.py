import collections
import logging

import numpy as np
import pytest
import torch
from tiny import tiny_tokenizer

from kprune.squad import best_spans, check_window_room, prepare_questions, tokenize_windows, window_lengths

CONTEXT = " ".join(f"word{index}" for index in range(20))  # one token per word
QUESTIONS = ["word1 word2", "word3 word4"]
CONTEXTS = [CONTEXT, "word5 word6"]
WINDOW = dict(max_length=16, stride=4, max_question_tokens=4)  # 11 context tokens a window


@pytest.fixture
def tokenizer(tmp_path):
    return tiny_tokenizer(tmp_path)


def context_words(windows, window: int, contexts=CONTEXTS) -> list[str]:
    context = contexts[int(windows.example_index[window])]
    spans = windows.offsets[window][windows.context_mask[window]].tolist()
    return [context[start:end] for start, end in spans]


def test_long_contexts_become_overlapping_windows(tokenizer):
    windows = tokenize_windows(QUESTIONS, CONTEXTS, tokenizer, **WINDOW)
    assert windows.example_index.tolist() == [0, 0, 0, 1]
    # [CLS] q q [SEP] context [SEP]: 11 context tokens, consecutive windows share stride=4 of them.
    assert [context_words(windows, w) for w in range(3)] == [
        [f"word{i}" for i in range(0, 11)],
        [f"word{i}" for i in range(7, 18)],
        [f"word{i}" for i in range(14, 20)],
    ]
    assert context_words(windows, 3) == ["word5", "word6"]
    assert windows.inputs["attention_mask"].sum(1).tolist() == [16, 16, 11, 7]
    question = tokenizer.convert_tokens_to_ids(["[CLS]", "word1", "word2", "[SEP]"])
    assert windows.inputs["input_ids"][1, :4].tolist() == question
    assert not windows.context_mask[windows.inputs["attention_mask"] == 0].any()  # padding is not context

    lengths, example = window_lengths(QUESTIONS, CONTEXTS, tokenizer, **WINDOW)
    assert (lengths.tolist(), example.tolist()) == ([16, 16, 11, 7], [0, 0, 0, 1])


def test_long_questions_are_cut_and_counted(tokenizer, caplog):
    long_question = "   " + " ".join(f"word{index}" for index in range(10))
    with caplog.at_level(logging.WARNING, logger="kprune"):
        questions = prepare_questions([long_question, "  word1 word2"], tokenizer, max_question_tokens=4)
    assert questions == ["word0 word1 word2 word3", "word1 word2"]  # left-stripped, cut at 4 tokens
    assert "cut 1 of 2 questions to 4 tokens" in caplog.text
    windows = tokenize_windows([long_question], [CONTEXT], tokenizer, **WINDOW)
    assert windows.inputs["input_ids"][0, :6].tolist() == tokenizer.convert_tokens_to_ids(
        ["[CLS]", "word0", "word1", "word2", "word3", "[SEP]"]
    )


def test_a_stride_without_room_is_one_clear_error(tokenizer):
    check_window_room(tokenizer, 16, 8, 4)  # 9 context tokens a window: fine
    with pytest.raises(ValueError, match=r"stride 9 must be in \[0, 9\): a window of max_length 16"):
        check_window_room(tokenizer, 16, 9, 4)
    with pytest.raises(ValueError, match="stride 384 must be in"):
        tokenize_windows(QUESTIONS, CONTEXTS, tokenizer, max_length=384, stride=384)


def position(windows, window: int, word: str) -> int:
    """Position of a context word in a window."""
    words = context_words(windows, window)
    return int(torch.nonzero(windows.context_mask[window])[words.index(word), 0])


def test_best_span_by_hand(tokenizer):
    windows = tokenize_windows(QUESTIONS, CONTEXTS, tokenizer, **WINDOW)
    logits = torch.full((4, 16, 2), -10.0)
    logits[:, 0] = torch.tensor([[3.0, 3.0], [8.0, 8.0], [6.0, 6.0], [9.0, 9.0]])  # [CLS]: null scores
    start, end = logits[..., 0], logits[..., 1]
    start[0, position(windows, 0, "word2")], end[0, position(windows, 0, "word3")] = 4, 4  # score 8
    start[1, position(windows, 1, "word9")], end[1, position(windows, 1, "word10")] = 5, 5  # 10: best
    start[1, 1] = end[1, 2] = 20  # question tokens are not answers
    start[2, position(windows, 2, "word15")], end[2, position(windows, 2, "word14")] = 7, 7  # end < start
    start[2, position(windows, 2, "word16")], end[2, position(windows, 2, "word19")] = 6, 6  # 4 tokens
    # Example 1: every top-3 start or end lies outside the context: no valid span.
    start[3, :3], end[3, [0, 3, 6]] = torch.tensor([9.0, 8.0, 7.0]), torch.tensor([9.0, 8.0, 7.0])

    spans = best_spans(windows, logits, CONTEXTS, n_best=3, max_answer_length=3)
    assert spans.text == ["word9 word10", ""]
    # Null score: the smallest [CLS] start + end over an example's windows (6); minus the best span's.
    assert spans.null_score_diff.tolist() == [6.0 - 10.0, np.inf]
    assert spans.answers(0.0) == ["word9 word10", ""]
    assert spans.answers(-5.0) == ["", ""]

    spans = best_spans(windows, logits, CONTEXTS, n_best=3, max_answer_length=4)
    assert spans.text[0] == "word16 word17 word18 word19"  # 12 beats 10 once 4 tokens are allowed


def run_qa_postprocessing(windows, logits, contexts, n_best, max_answer_length):
    """transformers' examples/pytorch/question-answering/utils_qa.py loop, transcribed (v2 mode)."""
    offsets = [
        [tuple(o) if c else None for o, c in zip(offs.tolist(), mask.tolist(), strict=True)]
        for offs, mask in zip(windows.offsets, windows.context_mask, strict=True)
    ]
    features_per_example = collections.defaultdict(list)
    for feature, example in enumerate(windows.example_index.tolist()):
        features_per_example[example].append(feature)
    texts, diffs = [], []
    for example, context in enumerate(contexts):
        min_null, best = None, None
        for feature in features_per_example[example]:
            start_logits, end_logits = logits[feature, :, 0].numpy(), logits[feature, :, 1].numpy()
            null = start_logits[0] + end_logits[0]
            min_null = null if min_null is None or null < min_null else min_null
            for s in np.argsort(start_logits)[-1 : -n_best - 1 : -1].tolist():
                for e in np.argsort(end_logits)[-1 : -n_best - 1 : -1].tolist():
                    if offsets[feature][s] is None or offsets[feature][e] is None:
                        continue
                    if e < s or e - s + 1 > max_answer_length:
                        continue
                    score = start_logits[s] + end_logits[e]
                    if best is None or score > best[0]:
                        best = (score, context[offsets[feature][s][0] : offsets[feature][e][1]])
        texts.append(best[1] if best else "")
        diffs.append(min_null - best[0] if best else np.inf)
    return texts, np.array(diffs)


def test_best_spans_match_the_reference_loop(tokenizer):
    contexts = [CONTEXT, "word5 word6", " ".join(f"word{i % 40}" for i in range(7, 40)), "word1 word2 word3"]
    questions = ["word1 word2", "word3", "word4 word5 word6", "word0"]
    windows = tokenize_windows(questions, contexts, tokenizer, **WINDOW)
    generator = torch.Generator().manual_seed(0)
    for n_best, max_answer_length in ((20, 30), (4, 3), (2, 1)):
        logits = torch.randn(*windows.context_mask.shape, 2, generator=generator, dtype=torch.float64)
        logits[~windows.inputs["attention_mask"].bool()] = float("-inf")  # padding, as predict() returns it
        spans = best_spans(windows, logits, contexts, n_best, max_answer_length)
        texts, diffs = run_qa_postprocessing(windows, logits, contexts, n_best, max_answer_length)
        assert spans.text == texts
        np.testing.assert_allclose(spans.null_score_diff, diffs)
    assert sum(text == "" for text in texts) >= 1  # n_best=2, one-token answers: some examples have none


def test_postprocessing_needs_offsets_and_matching_logits(tokenizer):
    windows = tokenize_windows(QUESTIONS, CONTEXTS, tokenizer, **WINDOW, with_offsets=False)
    assert windows.offsets is None and windows.context_mask is None
    with pytest.raises(ValueError, match="without offsets"):
        best_spans(windows, torch.zeros(4, 16, 2), CONTEXTS)
    windows = tokenize_windows(QUESTIONS, CONTEXTS, tokenizer, **WINDOW)
    with pytest.raises(ValueError, match=r"must be \(windows, length, 2\) = \(4, 16, 2\), got \(4, 15, 2\)"):
        best_spans(windows, torch.zeros(4, 15, 2), CONTEXTS)
