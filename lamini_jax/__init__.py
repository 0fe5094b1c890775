"""lamini-jax: Lamini Memory Tuning and the Lamini-1 Mixture of Memory Experts in JAX/Flax.

Shape letters, one legend for the whole package (and `lamini_jax_kernels`): an
array's name ends in its shape (`x_BxTxD`), and einsum strings use the same letters.

  Backbone                               MoME (a router and an expert table)
  B  batch rows                          E  experts in a layer's table
  T  token / query positions             A  router heads
  S  key positions (KV-cache slots)      M  experts selected per router head (top_k)
  D  model width                         K  expert slots per token (K = A * M)
  N  query heads                         Q  router query width; C = Q / 2 per sub-key half
  Y  key/value heads                     I, J  sub-keys of the first and second half
  G  query heads per KV head (N = Y * G) U  gathered (unique) expert rows of a step
  Z  grouped query rows (Z = G * T)      P  positions picked from a larger set (the
                                            facts' answer positions; the T * K slots)
  H  head dim                            R  adapter rank: LoRA's, or an expert's
  F  MLP width                           W  corpus windows
  V  vocabulary                          X  any leading shape
  L  layers
"""
