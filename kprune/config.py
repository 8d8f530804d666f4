"""Hyperparameters of K-prune, with the reference defaults."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# How predictive knowledge is measured (kprune.knowledge): the per-example Fisher, or the reference
# code's squared batch-mean gradients.
FISHER = "fisher"
BATCH_GRADIENT = "batch-gradient"
PREDICTIVE_MODES = (FISHER, BATCH_GRADIENT)
RAW_SCALE, MEAN_SCALE = "raw", "mean"  # how the knowledge terms are scaled
KNOWLEDGE_SCALES = (RAW_SCALE, MEAN_SCALE)
# When the units above sublayer t are re-scored (kprune.iterate): at every sublayer (the paper), or once per
# layer, at its attention sublayer, whose measurement the layer's FFN sublayer reuses.
SUBLAYER_RESCORE, LAYER_RESCORE = "sublayer", "layer"
RESCORE_MODES = (SUBLAYER_RESCORE, LAYER_RESCORE)
ALL_TOKENS = "all"  # knowledge_tokens: measure knowledge on the whole sample
# The precision of the knowledge measurement's matrix products (kprune.knowledge): float32, or bfloat16
# under autocast (sums, LayerNorms, the residual stream and the tuning stay in float32).
FLOAT32, BFLOAT16 = "float32", "bfloat16"
KNOWLEDGE_PRECISIONS = (FLOAT32, BFLOAT16)
DEFAULT_NUM_TOKENS = 100_000  # tokens of the calibration sample (the paper's)
# Padded tokens per backward pass of a knowledge measurement (K-prune's and Kwon et al.'s). Its autograd graph
# holds about 30 MB per BERT-base layer per 600 tokens: at 1,024 tokens the graph of the twelve layers
# above t = 0 was the peak of a BERT-base prune (measured: 1.53 GB at 1,024, 1.38 at 512, 1.15 at 256,
# the same time within the noise).
MICRO_BATCH_TOKENS = 256

DEFAULT, PAPER = "default", "paper"

# What each preset sets; a field given explicitly overrides its preset's value.
PRESETS: dict[str, dict] = {
    # The published algorithm (as kprune ran it before the improvements): raw knowledge scales with the
    # reference's lam_rep, every token everywhere, least squares on the whole sample towards zero.
    # Knowledge is measured on the whole sample at every sublayer.
    PAPER: dict(
        lam_rep=2.5e-4,
        mu=1.0,
        knowledge_scale=RAW_SCALE,
        head_positions=False,
        check_fraction=0.0,
        tune_head=False,
        rescore=SUBLAYER_RESCORE,
        knowledge_tokens=ALL_TOKENS,
    ),
    # The improved algorithm: knowledge terms on comparable scales (lam_rep a relative weight), the last
    # layer scored and tuned where the head reads it, tuning that is checked on held-out sequences (the
    # head's first linear map included); and,
    # for speed, knowledge re-scored once per layer on about 25k tokens of the sample (the least squares
    # use all of it): 0.3x the time at the exact measurement's accuracy on two teachers (README, Accuracy).
    DEFAULT: dict(
        lam_rep=0.25,
        mu=1.0,
        knowledge_scale=MEAN_SCALE,
        head_positions=True,
        check_fraction=0.2,
        tune_head=True,
        rescore=LAYER_RESCORE,
        knowledge_tokens=25_000,
    ),
}
PRESET_FIELDS = tuple(PRESETS[DEFAULT])


@dataclass(frozen=True)
class KPruneConfig:
    """Everything that decides what K-prune keeps.

    flops_keep: fraction of the encoder's FLOPs the pruned model may keep, in (0, 1]
        (0.4 keeps 40%, i.e. removes 60%). FLOPs count attention heads and FFN neurons only.
    seq_len: average tokens per sequence used by the FLOPs model; None: the mean real length of the
        calibration sample, the default of every entry point (see kprune.sample.resolve_seq_len).
    preset: "default" (the improved algorithm) or "paper" (the published one); it sets lam_rep, mu,
        knowledge_scale, head_positions, check_fraction, tune_head, rescore and knowledge_tokens wherever
        they are left None (see PRESETS).
    lam_pred, lam_rep: weights of predictive and representational knowledge (paper: 1, 2.5e-4 on raw
        scales). With knowledge_scale "mean" each term is first divided by its mean over the candidate units,
        so lam_rep is the representational term's weight relative to the predictive one (1: as much).
    knowledge_scale: "raw" (the paper) or "mean" (each knowledge term over its mean, per iteration).
    head_positions: for sequence classification and regression, the last layer's sublayers are scored
        (representational knowledge) and tuned on the first token's rows only, the one position the head
        reads; QA reads every position and keeps every token.
    mu: extra weight of head scores. The reference code averages a head's knowledge over its d_h
        dimensions and multiplies by mu=64, which is the *sum* for BERT-base's d_h=64. kprune measures a
        head as a whole (one mask per head, representational knowledge summed over its dimensions), so
        the same balance is mu=1 for every d_h; other values tilt the search towards (>1) or away
        from (<1) heads.
    temperature: softmax temperature of the soft labels (reference: 2).
    tune_weights: refit each pruned sublayer's output projection by least squares.
    check_fraction: share of the sample's sequences (seeded) held out to check the tuning: the ridge towards
        the current weight whose strength (of tune_strengths) has the lowest check error is refitted on the
        whole sample, or the weight stays as it is when that is better (kprune.tune.solve_towards_current).
        0: the paper's tuning, every token, a ridge of ``ridge`` towards zero.
    tune_strengths: the relative ridge strengths tried (times the mean diagonal of the Gram matrix).
    tune_head: after the last sublayer, refit the head's first linear map (BERT's pooler, RoBERTa's
        classifier.dense, DistilBERT's pre_classifier; QA's qa_outputs), weight and bias, to the teacher's
        output of that map on the positions the head reads, checked like the sublayers' tuning but, for
        classifiers and regressors, by the distance of the check part's logits to the teacher's (it needs
        check_fraction > 0 and tune_weights); the rest of the head reads that map's output unchanged.
    ridge: relative ridge of the paper's least squares (times the mean diagonal of the Gram matrix).
    projections: random projections per example for the Fisher of QA and of classifiers with more than
        projections + 1 classes (exact otherwise).
    predictive_knowledge: "fisher" (per-example Fisher, non-zero at iteration 0) or "batch-gradient"
        (the reference code's squared batch-mean gradients; for ablations).
    batch_size: sequences per forward pass; seed: seeds the random projections.
    knowledge_tokens: measure knowledge on whole batches of the sample (seeded) holding about this many
        tokens instead of all of it: fewer passes through the sublayers above, an approximation of the
        paper's measurement; the least squares still use every token. "all": the whole sample (paper);
        default preset 25,000.
    micro_batch_tokens: padded tokens per backward pass of the knowledge measurement; bounds the memory of
        its autograd graph (the per-example Fisher does not depend on it; raise it on a large GPU).
    knowledge_precision: "float32", or "bfloat16": the measurement's forward and backward matrix products
        in bfloat16 (torch.autocast; the squared features, the gradients' sums, the tuning and the pruned
        model stay in float32). An approximation for speed on hardware with bfloat16 products (CPUs with
        AVX-512 BF16 or AMX, recent GPUs).
    rescore: "sublayer" (paper): knowledge is measured at every sublayer t; "layer" (default preset): at
        each layer's attention sublayer only, and the FFN sublayer above it reuses that measurement
        (without the attention sublayer's units), an approximation that halves the measurements; the
        FLOPs left, the mask search and the tuning are unchanged.
    """

    flops_keep: float
    preset: str = DEFAULT
    seq_len: float | None = None
    lam_pred: float = 1.0
    lam_rep: float | None = None
    mu: float | None = None
    knowledge_scale: str | None = None
    head_positions: bool | None = None
    temperature: float = 2.0
    tune_weights: bool = True
    check_fraction: float | None = None
    tune_head: bool | None = None
    tune_strengths: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
    ridge: float = 1e-4
    projections: int = 8
    predictive_knowledge: str = FISHER
    batch_size: int = 32
    seed: int = 0
    knowledge_tokens: int | str | None = None
    micro_batch_tokens: int = MICRO_BATCH_TOKENS
    knowledge_precision: str = FLOAT32
    rescore: str | None = None

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {self.preset!r}")
        preset = PRESETS[self.preset]
        for name in PRESET_FIELDS:
            if getattr(self, name) is None:
                object.__setattr__(self, name, preset[name])
        object.__setattr__(self, "tune_strengths", tuple(float(s) for s in self.tune_strengths))
        if self.knowledge_scale not in KNOWLEDGE_SCALES:
            raise ValueError(
                f"knowledge_scale must be one of {KNOWLEDGE_SCALES}, got {self.knowledge_scale!r}"
            )
        if not 0.0 <= self.check_fraction < 1.0:
            raise ValueError(
                f"check_fraction must be in [0, 1) (0: no check part), got {self.check_fraction}"
            )
        if not self.tune_strengths or any(not s > 0 for s in self.tune_strengths):
            raise ValueError(f"tune_strengths must be numbers > 0, got {self.tune_strengths}")
        if not 0.0 < self.flops_keep <= 1.0:
            raise ValueError(
                f"flops_keep must be in (0, 1] (the fraction of FLOPs kept), got {self.flops_keep}"
            )
        if self.seq_len is not None and self.seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {self.seq_len}")
        for name in ("head_positions", "tune_head"):
            object.__setattr__(self, name, bool(getattr(self, name)))
        for name in ("lam_pred", "lam_rep", "mu", "ridge"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.predictive_knowledge not in PREDICTIVE_MODES:
            raise ValueError(
                f"predictive_knowledge must be one of {PREDICTIVE_MODES}, got {self.predictive_knowledge!r}"
            )
        if self.knowledge_tokens != ALL_TOKENS and not (
            isinstance(self.knowledge_tokens, int)
            and not isinstance(self.knowledge_tokens, bool)  # True is an int: a slip, not 1 token
            and self.knowledge_tokens >= 1
        ):
            raise ValueError(
                f"knowledge_tokens must be an integer >= 1 or {ALL_TOKENS!r}, got {self.knowledge_tokens!r}"
            )
        if self.knowledge_precision not in KNOWLEDGE_PRECISIONS:
            raise ValueError(
                f"knowledge_precision must be one of {KNOWLEDGE_PRECISIONS}, got {self.knowledge_precision!r}"
            )
        if self.rescore not in RESCORE_MODES:
            raise ValueError(f"rescore must be one of {RESCORE_MODES}, got {self.rescore!r}")
        if self.batch_size < 1 or self.projections < 1 or self.micro_batch_tokens < 1:
            raise ValueError("batch_size, projections and micro_batch_tokens must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)
