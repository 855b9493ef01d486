"""Online test-time adaptation (METHODS.md §2-3): CEMA and the baselines it is compared with.

- `adaptable`: a model split into its trainable normalisation affine parameters and the
  frozen rest, applied with test-batch statistics;
- `losses`: entropy, the reliability weights and the distillation loss;
- `baselines`: `source`, `norm`, `tent`, `eata`, `sar`, each an on-device step;
- `cema`: the edge and the cloud of CEMA, separate objects talking through messages.

Every method takes one stream batch at a time and returns the predictions made *before*
that batch changed anything, which are the ones scored.
"""
