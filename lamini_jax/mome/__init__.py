"""Lamini-1 Mixture of Memory Experts (MoME): a frozen router over a large table of experts.

One concept a module:
  config        MomeConfig (a layer) and MomeTuningConfig (the `mome:` section of a run)
  router        product-key top-k selection, the balance bias
  table         the expert table, gather-and-apply, keyed rows
  sparse_optim  per-row optax updates of the touched rows, written in place
  collisions    facts sharing experts, and the balance that spreads them
  layer         MomeLayer, the residual branch, and its variable collections
  inputs        each layer's input at the facts' answer positions
  steps         phase-1, phase-2 and dense train steps, the decision hinge
  anchors       the penalty that keeps experts silent on other text
  tuning        prepare / tune_mome / load_mome
"""
