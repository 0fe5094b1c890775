"""Picks the gather-apply implementation for the backend.

  impl               what runs
  "reference"        `lamini_jax_kernels.gather_apply.gather_apply_reference` (XLA gather + einsum)
  "pallas"           `lamini_jax_kernels.tpu.gather_apply` compiled by Mosaic (TPU)
  "pallas_interpret" the same kernels in TPU interpret mode (any backend; slow, for tests)
  "triton"           `lamini_jax_kernels.gpu.gather_apply` through jax-triton (GPU; optional `gpu` extra)
  "auto"             pallas on TPU, reference on GPU and CPU (on an H200 the Triton kernels
                     were no faster than XLA's gather + einsum: docs/kernels.md)

`get_gather_apply(impl)` returns a `GatherApplyFn`; `get_gather_apply_vjp(impl)`
the forward with the row-gradient backward (`lamini_jax_kernels.gather_apply.RowGrads`).
A config selects one by name (`IMPLS`); `gather_apply_auto` is "auto" as a plain
function, the default of the MoME layer.
"""

from collections.abc import Callable
import functools
import logging
from typing import Any

import jax
from jax.experimental.pallas import tpu as pltpu

from lamini_jax_kernels import gather_apply as ga
from lamini_jax_kernels.gpu import gather_apply as gpu_ga
from lamini_jax_kernels.tpu import gather_apply as tpu_ga

_LOG = logging.getLogger("lamini_jax_kernels")
IMPLS = ("auto", "reference", "pallas", "pallas_interpret", "triton")
GPU_BACKENDS = ("gpu", "cuda", "rocm")


def _check(impl: str) -> None:
  if impl not in IMPLS:
    raise ValueError(f"gather-apply impl={impl!r} is not one of {IMPLS}")




def explain(impl: str = "auto", backend: str | None = None) -> tuple[str, str]:
  """(the concrete implementation `impl` stands for on `backend` (default: jax's), why)."""
  _check(impl)
  if impl != "auto":
    return impl, "asked for by name"
  backend = backend or jax.default_backend()
  if backend in GPU_BACKENDS:
    # Measured on an H200 (jax 0.11.2): XLA's gather + einsum ran the forward in 0.85x the Triton
    # kernels' time, the row backward in 0.73x, the training pass and the Llama-3-8B MoME step in
    # the same time (docs/kernels.md); impl="triton" still asks for the kernels.
    return "reference", (f"auto on {backend}: the XLA gather + einsum, as fast as or faster than"
                         " the Triton kernels where measured (docs/kernels.md)")
  if backend == "tpu":
    return "pallas", "auto on tpu: the Pallas (Mosaic) kernels"
  return "reference", f"auto on {backend}: no kernel for this backend, the XLA gather + einsum"


@functools.cache
def _say_once(impl: str, concrete: str, why: str) -> None:
  _LOG.info("gather-apply %r runs %r: %s", impl, concrete, why)


def resolve(impl: str = "auto", backend: str | None = None) -> str:
  """The concrete implementation `impl` stands for on `backend`; "auto" logs its choice once."""
  concrete, why = explain(impl, backend)
  if impl == "auto":
    _say_once(impl, concrete, why)
  return concrete


def _block_sizes(module, block_sizes: Any, impl: str) -> Any:
  if block_sizes is None:
    return module.BlockSizes()
  if not isinstance(block_sizes, module.BlockSizes):
    raise TypeError(f"gather-apply impl={impl!r} takes block_sizes of type"
                    f" {module.__name__}.BlockSizes, got {type(block_sizes).__name__}")
  return block_sizes


def _contractions(impl: str, block_sizes: Any):
  """(gather_dot, gather_combine) of a concrete implementation."""
  if impl == "reference":
    return ga.gather_dot_reference, ga.gather_combine_reference
  if impl in ("pallas", "pallas_interpret"):
    interpret = pltpu.InterpretParams() if impl == "pallas_interpret" else False
    return tpu_ga.contractions(_block_sizes(tpu_ga, block_sizes, impl), interpret)
  gpu_ga.require()
  return gpu_ga.contractions(_block_sizes(gpu_ga, block_sizes, impl))


@functools.cache
def _make(impl: str, block_sizes: Any) -> ga.GatherApplyFn:
  return ga.make_gather_apply(*_contractions(impl, block_sizes))


def get_gather_apply(impl: str = "auto", *, block_sizes: Any = None) -> ga.GatherApplyFn:
  """A `GatherApplyFn` for `impl` (see the module docstring).

  "reference" is `gather_apply_reference` itself; the kernels come wrapped in
  the custom_vjp of `lamini_jax_kernels.gather_apply.make_gather_apply`. block_sizes is the
  backend's `BlockSizes` (lamini_jax_kernels.tpu / lamini_jax_kernels.gpu), None for its default.
  Raises ValueError for an unknown name and ImportError for "triton" without
  triton and jax-triton on a GPU jaxlib.
  """
  impl = resolve(impl)
  if impl == "reference":
    return ga.gather_apply_reference
  return _make(impl, block_sizes)


def get_gather_apply_vjp(impl: str = "auto", *, block_sizes: Any = None) -> Callable[..., Any]:
  """fn(x, idx, w, down, up, activation) -> (y_TxD, vjp_rows) for `impl`.

  vjp_rows(dy_TxD) -> (dx_TxD, dw_TxK, RowGrads); "reference" uses XLA gathers.
  """
  dot, combine = _contractions(resolve(impl), block_sizes)
  return functools.partial(ga.gather_apply_vjp, dot, combine)


def gather_apply_auto(x_TxD, idx_TxK, w_TxK, down_ExDxR, up_ExRxD, activation):
  """`get_gather_apply("auto")`, resolved when traced (by `jax.default_backend()`)."""
  return get_gather_apply("auto")(x_TxD, idx_TxK, w_TxK, down_ExDxR, up_ExRxD, activation)
