"""Accelerator kernels, one op per file, each checked against a pure-jnp reference.

  gather_apply.py      the MoME expert op: its reference, the custom_vjp built
                       from two gathered row contractions, `RowGrads`
  tpu/gather_apply.py  the contractions in Pallas (Mosaic TPU; TPU interpret mode on CPU)
  gpu/gather_apply.py  the contractions in Triton, called through jax-triton (optional)
  dispatch.py          `get_gather_apply(impl)`: the implementation for the backend
"""
