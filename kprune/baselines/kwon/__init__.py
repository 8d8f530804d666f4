"""Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers" (Mask-Tuning), in kprune terms.

Every head and FFN neuron gets a mask variable m (1 = kept). With the task loss L on true labels:

1. **Fisher importance.** Per-example gradients g_n = dL_n/dm at m = 1 over the sample (2048 sequences
   by default); the importance of a unit is the empirical Fisher diagonal sum_n g_n[i]^2.
2. **Mask search.** Heads and neurons are ranked separately by importance. For every head count h, the
   h best heads are kept and the rest of the FLOPs budget is filled with the best neurons; the
   configuration with the largest total importance wins (an exact optimum, all units of a kind cost the same).
3. **Mask rearrangement.** Per layer and kind, the unit count stays but the choice of units is revised
   with the layer's block of the empirical Fisher, F = sum_n g_n g_n^T: removing the set P costs about
   1_P^T F 1_P (second order), and a greedy pass swaps units while that estimate decreases.
4. **Mask rescaling.** Sublayer by sublayer, bottom-up, each kept unit gets a scale s_i by least squares so
   that X_S + sum_i s_i W_i f_i + b reproduces the reconstruction target's pre-LayerNorm output
   X_T + Sub_T(X_T) over all sample tokens; X_S is the input of the pruned, already rescaled model.

The scaled masks are then baked into a physically smaller model with kprune's surgery (the scales multiply
the kept units' output-projection columns), so the result is evaluated exactly like K-prune's.

What follows the reference code (WoosukKwon/retraining-free-pruning) and what does not:

- The constraint is a fraction of FLOPs kept computed with kprune.flops (the reference's MAC model counts
  the same heads and neurons at half the value, so fractions agree) at the same seq_len as K-prune.
- The reconstruction target is, as in the reference code, the model pruned by the same search to the
  intermediate budget sqrt(flops_keep) (their two-step schedule); ``teacher_keep=1.0`` targets the unpruned
  model instead. Attention rescaling fits an extra constant offset over all outputs (discarded after the
  fit: LayerNorm removes it), the first layer's attention is not rescaled, the last FFN of a
  classification/regression model is fitted on the first ([CLS]) token only, and rescaling stops for the
  remaining sublayers as soon as a solution has a scale outside [-max_scale, max_scale] (reference: 10).
- Fisher gradients are per example (the paper's definition; the reference code squares mini-batch
  gradients). The reference solves the normal equations with LSMR, damped towards scale 1; here they
  are solved in float64 by Cholesky with a small relative ridge towards scale 1 (lstsq fallback).
- The search also considers zero heads and never lets the neuron count go negative (the reference loop
  starts at one head and would slice with a negative neuron count under tiny budgets).
- QA loss ignores padding positions (masked out of the start/end softmax), so it does not depend on batching.

Memory: the method computes on the model's own weights (a frozen twin that shares them; the pruned result
gets its own copy), the Fisher's backward passes and the rescaling's passes go through micro-batches of at
most ``micro_batch_tokens`` padded tokens, and the whole-sample data (per-example gradients, the student's
and the target's hidden states) are kept in temporary files on the CPU (``offload``, as kprune.prune).

One module per step, as in the reference: ``labels`` (true labels, task loss), ``fisher`` (1), ``search``
(2), ``rearrange`` (3), ``rescale`` (4), and ``prune`` (the options and the steps in order).
"""

from kprune.baselines.kwon.prune import METHOD, KwonConfig, KwonMasks, kwon_masks, kwon_prune

__all__ = ["METHOD", "KwonConfig", "KwonMasks", "kwon_masks", "kwon_prune"]
