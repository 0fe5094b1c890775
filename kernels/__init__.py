"""Accelerator kernels, one op per file, each checked against a pure-jnp reference.

  gather_apply.py      the MoME expert op: its reference, the custom_vjp built
                       from two gathered row contractions, `RowGrads`
  tpu/gather_apply.py  the contractions in Pallas (Mosaic TPU; TPU interpret mode on CPU)
  gpu/gather_apply.py  the contractions in Triton, called through jax-triton (optional)
  dispatch.py          `get_gather_apply(impl)`: the implementation for the backend

Installed as `lamini_jax_kernels`. Run from the checkout (`python -m experiments...`,
`python -m pytest`), the checkout is on sys.path and this folder would also answer to the
top-level name `kernels`, which is Hugging Face's kernel-hub package, a dependency of
`transformers` since 5.x: `import transformers.activations` then fails with "cannot import name
'CUDAProperties' from 'kernels'". Imported under that name, this module hands the name to the
installed `kernels` distribution when there is one.
"""

import importlib.machinery
import importlib.util
import os
import sys


def _hand_over_name() -> None:
  """sys.modules["kernels"] = the `kernels` found on sys.path without this checkout, if any
  (Python's import returns what a module leaves in sys.modules under its name)."""
  checkout = os.path.realpath(os.path.join(os.path.dirname(__file__), os.pardir))
  path = [p for p in sys.path if os.path.realpath(p or os.curdir) != checkout]
  spec = importlib.machinery.PathFinder.find_spec("kernels", path)
  if spec is None or spec.loader is None:
    return
  module = importlib.util.module_from_spec(spec)
  sys.modules["kernels"] = module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    sys.modules.pop("kernels", None)
    raise


if __name__ == "kernels":
  _hand_over_name()
