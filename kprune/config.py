"""Hyperparameters of K-prune, with the reference defaults."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# How predictive knowledge is measured (kprune.knowledge): the per-example Fisher, or the reference
# code's squared batch-mean gradients.
FISHER = "fisher"
BATCH_GRADIENT = "batch-gradient"
PREDICTIVE_MODES = (FISHER, BATCH_GRADIENT)
DEFAULT_NUM_TOKENS = 100_000  # tokens of the calibration sample (the paper's)


@dataclass(frozen=True)
class KPruneConfig:
    """Everything that decides what K-prune keeps.

    flops_keep: fraction of the encoder's FLOPs the pruned model may keep, in (0, 1]
        (0.4 keeps 40%, i.e. removes 60%). FLOPs count attention heads and FFN neurons only.
    seq_len: average tokens per sequence used by the FLOPs model; None: the mean real length of the
        calibration sample, the default of every entry point (see kprune.sample.resolve_seq_len).
    lam_pred, lam_rep: weights of predictive and representational knowledge (reference: 1, 2.5e-4).
    mu: extra weight of head scores. The reference code averages a head's knowledge over its d_h
        dimensions and multiplies by mu=64, which is the *sum* for BERT-base's d_h=64. kprune measures a
        head as a whole (one mask per head, representational knowledge summed over its dimensions), so
        the same balance is mu=1 for every d_h; other values tilt the search towards (>1) or away
        from (<1) heads.
    temperature: softmax temperature of the soft labels (reference: 2).
    tune_weights: refit each pruned sublayer's output projection by least squares.
    ridge: relative ridge of that least squares (times the mean diagonal of the Gram matrix).
    projections: random projections per example for the Fisher of QA and of classifiers with more than
        projections + 1 classes (exact otherwise).
    predictive_knowledge: "fisher" (per-example Fisher, non-zero at iteration 0) or "batch-gradient"
        (the reference code's squared batch-mean gradients; for ablations).
    batch_size: sequences per forward pass; seed: seeds the random projections.
    knowledge_tokens: measure knowledge on whole batches of the sample (seeded) holding about this many
        tokens instead of all of it: fewer passes through the sublayers above, an approximation of the
        paper's measurement; the least squares still use every token. None (default): the whole sample.
    micro_batch_tokens: padded tokens per backward pass of the knowledge measurement; bounds the memory of
        its autograd graph (the per-example Fisher does not depend on it; raise it on a large GPU).
    """

    flops_keep: float
    seq_len: float | None = None
    lam_pred: float = 1.0
    lam_rep: float = 2.5e-4
    mu: float = 1.0
    temperature: float = 2.0
    tune_weights: bool = True
    ridge: float = 1e-4
    projections: int = 8
    predictive_knowledge: str = FISHER
    batch_size: int = 32
    seed: int = 0
    knowledge_tokens: int | None = None
    micro_batch_tokens: int = 1024

    def __post_init__(self) -> None:
        if not 0.0 < self.flops_keep <= 1.0:
            raise ValueError(
                f"flops_keep must be in (0, 1] (the fraction of FLOPs kept), got {self.flops_keep}"
            )
        if self.seq_len is not None and self.seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {self.seq_len}")
        for name in ("lam_pred", "lam_rep", "mu", "ridge"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.predictive_knowledge not in PREDICTIVE_MODES:
            raise ValueError(
                f"predictive_knowledge must be one of {PREDICTIVE_MODES}, got {self.predictive_knowledge!r}"
            )
        if self.knowledge_tokens is not None and self.knowledge_tokens < 1:
            raise ValueError(f"knowledge_tokens must be >= 1 or None, got {self.knowledge_tokens}")
        if self.batch_size < 1 or self.projections < 1 or self.micro_batch_tokens < 1:
            raise ValueError("batch_size, projections and micro_batch_tokens must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)
