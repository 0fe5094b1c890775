"""Tests for kernels/: gather-apply kernels against the pure-jnp reference.

Pallas kernels run in TPU interpret mode. The raw Triton kernels run in Triton's
interpreter when triton and torch are installed (a subprocess with
TRITON_INTERPRET=1, since triton reads it on import), else those tests skip.
Tolerance, elementwise: |kernel - reference| <= tol * (max |reference| + |reference|),
tol 1e-5 (float32) and 1e-2 (bfloat16); the reference runs in float32 on the same
(rounded) inputs, and every output element must be finite.
"""

import dataclasses
import functools
import importlib.util
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from lamini_jax.mome import config as mome_config
from lamini_jax.mome import layer as layer_lib
from lamini_jax.mome import sparse_optim
from lamini_jax.mome import table as table_lib
from lamini_jax import sharding
from lamini_jax_kernels import dispatch
from lamini_jax_kernels import gather_apply as ga
from lamini_jax_kernels.gpu import gather_apply as gpu_ga
from lamini_jax_kernels.tpu import gather_apply as tpu_ga

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
# With TRITON_INTERPRET=1 set before triton's import, triton.jit kernels run on the CPU.
IN_TRITON_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
# Output buffers start as NaN (uninitialized_memory), so unwritten elements show; reads
# past the edge of an array are NaN too, so an unmasked edge block shows.
INTERPRET = pltpu.InterpretParams(uninitialized_memory="nan")
PALLAS_BLOCKS = tpu_ga.BlockSizes(block_d=8)  # D = 20 and 9: partial edge blocks
TRITON_BLOCKS = gpu_ga.BlockSizes(dot_block_p=4, dot_block_d=8, combine_block_t=4,
                                  combine_block_d=8)


@dataclasses.dataclass(frozen=True)
class Case:
  tokens: int  # T
  slots: int  # K
  experts: int  # N
  width: int  # D
  rank: int  # R


BASE = Case(tokens=7, slots=3, experts=13, width=20, rank=2)
K1 = Case(tokens=5, slots=1, experts=11, width=9, rank=1)


def _inputs(case: Case, dtype, seed: int = 0):
  """(x, idx, w, down, up, dy): duplicates inside a token and across tokens, row N-1 used."""
  rng = np.random.default_rng(seed)
  t, k, n, d, r = case.tokens, case.slots, case.experts, case.width, case.rank
  idx = rng.integers(0, n, size=(t, k))
  idx[0, :] = 4  # every slot of token 0 on one expert
  idx[1, 0] = idx[2, -1] = 4  # and other tokens on it too
  idx[-1, -1] = n - 1
  cast = lambda a: jnp.asarray(a, jnp.float32).astype(dtype)
  return (cast(rng.normal(size=(t, d))), jnp.asarray(idx, jnp.int32),
          cast(rng.uniform(0.1, 1.0, size=(t, k))), cast(rng.normal(size=(n, d, r)) / np.sqrt(d)),
          cast(rng.normal(size=(n, r, d))), cast(rng.normal(size=(t, d))))


def _f32(tree):
  return jax.tree.map(
      lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def assert_close(actual, expected, dtype):
  tol = TOL[dtype]
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape
  assert np.isfinite(actual).all(), "non-finite elements (unwritten or poisoned)"
  np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * np.abs(expected).max())


def _vjp_all(fn, x, idx, w, down, up, dy, activation):
  """(y, dx, dw, d_down, d_up) of fn through jax.vjp w.r.t. x, w and the whole table."""
  y, vjp = jax.vjp(lambda x, w, down, up: fn(x, idx, w, down, up, activation), x, w, down, up)
  return (y, *vjp(dy))


@functools.partial(jax.jit, static_argnums=0)
def _reference_all(activation, x, idx, w, down, up, dy):
  """The reference's (y, dx, dw, d_down, d_up) in float32."""
  return _vjp_all(ga.gather_apply_reference, *_f32((x, idx, w, down, up, dy)), activation)


# ----------------------------------------------------------------------------
# The composition (forward and backward from two contractions), on jnp contractions.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("case, activation", [
    (BASE, jax.nn.gelu), (BASE, lambda h: h), (K1, jax.nn.relu), (K1, jax.nn.silu),
], ids=["base-gelu", "base-identity", "k1_r1-relu", "k1_r1-silu"])
def test_custom_vjp_on_reference_contractions_equals_reference(case, activation):
  fn = ga.make_gather_apply(ga.gather_dot_reference, ga.gather_combine_reference)
  args = _inputs(case, jnp.float32, seed=1)
  got = jax.jit(functools.partial(_vjp_all, fn, activation=activation))(*args)
  want = _reference_all(activation, *args)
  for g, w in zip(got, want):
    assert_close(g, w, jnp.float32)


def test_row_grads_are_per_slot_and_sum_to_table_gradient():
  x, idx, w, down, up, dy = _inputs(BASE, jnp.float32, seed=2)
  fwd = dispatch.get_gather_apply_vjp("reference")  # the kernels feed the same code

  @jax.jit
  def rows_of(x, idx, w, down, up, dy):
    y, vjp_rows = fwd(x, idx, w, down, up, jax.nn.gelu)
    return y, *vjp_rows(dy)

  y, dx, dw, rows = rows_of(x, idx, w, down, up, dy)
  p = BASE.tokens * BASE.slots
  assert rows.down_PxDxR.shape == (p, BASE.width, BASE.rank)
  assert rows.up_PxRxD.shape == (p, BASE.rank, BASE.width)
  np.testing.assert_array_equal(np.asarray(rows.idx_P), np.asarray(idx).reshape(-1))
  ref = _reference_all(jax.nn.gelu, x, idx, w, down, up, dy)
  for got, want in zip((y, dx, dw), ref[:3]):
    assert_close(got, want, jnp.float32)
  for table_rows, want in ((rows.down_PxDxR, ref[3]), (rows.up_PxRxD, ref[4])):
    summed = np.zeros(want.shape)
    np.add.at(summed, np.asarray(rows.idx_P), np.asarray(table_rows, np.float64))
    assert_close(summed, want, jnp.float32)
  # Each slot's up row is its own term, (w h)[t, k] outer dy[t], not a sum over duplicates.
  x64, w64, dy64 = (np.asarray(a, np.float64) for a in (x, w, dy))
  h = np.asarray(jax.nn.gelu(np.einsum("td,tkdr->tkr", x64, np.asarray(down, np.float64)[idx])))
  up_rows = np.einsum("tk,tkr,td->tkrd", w64, h, dy64).reshape(p, BASE.rank, BASE.width)
  assert_close(rows.up_PxRxD, up_rows, jnp.float32)


# ----------------------------------------------------------------------------
# Pallas (TPU interpret mode).
# ----------------------------------------------------------------------------


def test_interpret_mode_poisons_outputs_before_the_call():
  """The control for the Pallas tests: what a kernel leaves unwritten is NaN.

  HBM outputs and VMEM blocks start as NaN; a block whose step writes nothing
  keeps NaN (a later unwritten block would carry the previous block's stale
  values, which the comparisons against the reference catch).
  """

  def write_second_block(o_ref):
    @pl.when(pl.program_id(0) == 1)
    def _():
      o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

  out = np.asarray(pl.pallas_call(
      write_second_block, out_shape=jax.ShapeDtypeStruct((2, 8), jnp.float32), grid=(2,),
      out_specs=pl.BlockSpec((1, 8), lambda i: (i, 0)), interpret=INTERPRET)())
  assert np.isnan(out[0]).all() and (out[1] == 0).all()


@pytest.mark.parametrize("d_axis", [1, 2])
def test_pallas_contractions_write_every_element(d_axis):
  x, idx, _, down, up, _ = _inputs(BASE, jnp.float32, seed=3)
  table = down if d_axis == 1 else up
  c = jax.random.normal(jax.random.PRNGKey(3), (BASE.tokens, BASE.slots, BASE.rank))
  opts = dict(d_axis=d_axis, block_sizes=PALLAS_BLOCKS, interpret=INTERPRET)
  z = tpu_ga.gather_dot(x, idx, table, **opts)
  y = tpu_ga.gather_combine(c, idx, table, out_dtype=jnp.float32, **opts)
  rows = np.asarray(table, np.float64)[np.asarray(idx)]  # [T, K, a, b]
  rows_dr = rows if d_axis == 1 else np.swapaxes(rows, -1, -2)  # [T, K, D, R]
  assert_close(z, np.einsum("td,tkdr->tkr", np.asarray(x, np.float64), rows_dr), jnp.float32)
  assert_close(y, np.einsum("tkr,tkdr->td", np.asarray(c, np.float64), rows_dr), jnp.float32)


@pytest.mark.parametrize("case, dtype, activation", [
    (BASE, jnp.float32, jax.nn.gelu),
    (BASE, jnp.bfloat16, jax.nn.gelu),
    (K1, jnp.float32, jax.nn.silu),
    (K1, jnp.bfloat16, jax.nn.relu),
], ids=["base-f32", "base-bf16", "k1_r1-f32", "k1_r1-bf16"])
def test_pallas_forward_and_vjp_match_reference(case, dtype, activation):
  fn = dispatch.get_gather_apply("pallas_interpret", block_sizes=PALLAS_BLOCKS)
  args = _inputs(case, dtype, seed=4)
  got = jax.jit(functools.partial(_vjp_all, fn, activation=activation))(*args)
  want = _reference_all(activation, *args)
  for name, g, w in zip(("y", "dx", "dw", "d_down", "d_up"), got, want):
    assert g.dtype == dtype, name
    assert_close(g, w, dtype)


# ----------------------------------------------------------------------------
# Dispatcher and the MoME layer.
# ----------------------------------------------------------------------------


def test_dispatch_resolves_per_backend_and_rejects_bad_requests():
  assert dispatch.resolve("auto", backend="cpu") == "reference"
  assert dispatch.resolve("auto", backend="tpu") == "pallas"
  assert dispatch.resolve("auto", backend="gpu") == "reference"  # measured no slower (docs/kernels.md)
  assert dispatch.get_gather_apply("auto") is ga.gather_apply_reference  # tests run on CPU
  with pytest.raises(ValueError, match="not one of"):
    dispatch.get_gather_apply("cuda")
  with pytest.raises(TypeError, match="BlockSizes"):
    dispatch.get_gather_apply("pallas", block_sizes=TRITON_BLOCKS)
  if not gpu_ga.available():
    with pytest.raises(ImportError, match="gpu"):
      dispatch.get_gather_apply("triton")


def test_mome_layer_with_kernel_matches_reference_within_bf16():
  """Sparse-path output and row gradients of a bfloat16 layer: kernel vs float32 reference.

  Inputs and tables are rounded to bfloat16 first, so the float32 reference sees
  the same values (and routes the same experts). (The bfloat16 XLA reference
  itself is further off, 1e-2 to 2e-2 here, from rounding its intermediates.)
  """
  dtype = jnp.bfloat16
  cfg = mome_config.MomeConfig(num_experts=15, embed_dim=11, expert_rank=2, num_heads=2, key_dim=4,
                               top_k=2, activation="gelu", sub_keys=(3, 5))
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 5, cfg.embed_dim)).astype(dtype)
  variables = nn.unbox(jax.jit(layer_lib.MomeLayer(cfg).init)({"params": jax.random.PRNGKey(1)}, x))
  keys = jax.random.split(jax.random.PRNGKey(2), 2)
  tables = {name: jax.random.normal(key, a.shape).astype(dtype)
            for key, (name, a) in zip(keys, variables[layer_lib.TABLE].items())}
  frozen = {k: variables[k] for k in (layer_lib.ROUTER, layer_lib.BALANCE)}

  @functools.partial(jax.jit, static_argnums=0)
  def run(gather_apply, x, tables):
    layer = layer_lib.MomeLayer(cfg, gather_apply)

    def loss(deltas):
      y, aux = layer.apply({**frozen, layer_lib.TABLE: tables, layer_lib.DELTA: deltas}, x,
                           mutable=[layer_lib.UNIQ])
      return jnp.sum(jnp.sin(y.astype(jnp.float32))), (y, aux[layer_lib.UNIQ]["uniq"])

    (_, (y, uniq)), g = jax.value_and_grad(loss, has_aux=True)(
        sparse_optim.zero_deltas(tables, x.shape[1] * cfg.slots))
    return y, g, uniq

  kernel = dispatch.get_gather_apply("pallas_interpret", block_sizes=PALLAS_BLOCKS)
  y, g, uniq = run(kernel, x, tables)
  y_ref, g_ref, uniq_ref = run(ga.gather_apply_reference, *_f32((x, tables)))
  np.testing.assert_array_equal(np.asarray(uniq), np.asarray(uniq_ref))
  assert_close(y, y_ref, dtype)
  for name in ("down", "up"):
    assert g[name].dtype == dtype
    assert_close(g[name], g_ref[name], dtype)


def test_kernel_in_shard_map_over_row_sharded_table_matches_reference():
  """apply_experts on a (2 data x 4 expert) mesh: forward and gradients, kernel vs reference."""
  cfg = mome_config.MomeConfig(num_experts=16, embed_dim=9, expert_rank=2, num_heads=2, key_dim=4,
                               top_k=2, activation="gelu")
  mesh = sharding.make_mesh(2, 4)
  x, idx, w, _, _, _ = _inputs(Case(tokens=6, slots=cfg.slots, experts=16, width=9, rank=2),
                               jnp.float32, seed=6)
  keys = jax.random.split(jax.random.PRNGKey(6), 2)
  shapes = table_lib.table_shapes(cfg)
  table = jax.device_put(
      {name: jax.random.normal(key, shapes[name]) for key, name in zip(keys, ("down", "up"))},
      jax.sharding.NamedSharding(mesh, sharding.row_spec(3)))
  sharding.check_expert_sharded(table, mesh)

  def loss_and_grads(gather_apply):
    loss = lambda x, w, table: jnp.sum(jnp.sin(
        table_lib.apply_experts(x, idx, w, table, cfg, gather_apply, mesh)))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, w, table)

  got = loss_and_grads(dispatch.get_gather_apply("pallas_interpret", block_sizes=PALLAS_BLOCKS))
  want = loss_and_grads(ga.gather_apply_reference)
  for g, w_ in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert_close(g, w_, jnp.float32)


# ----------------------------------------------------------------------------
# Triton kernels in Triton's interpreter (CPU).
# ----------------------------------------------------------------------------


def _to_torch(torch, a):
  a = np.asarray(a)
  if a.dtype == ml_dtypes.bfloat16:
    return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
  return torch.from_numpy(a.copy())


def _from_torch(torch, t):
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def _interpreted_contractions(module, torch, blocks):
  """(gather_dot, gather_combine) running the raw Triton kernels on host via pure_callback.

  Outputs start as NaN, so unwritten elements show.
  """

  def dot(a_TxD, idx_TxK, table, *, d_axis):
    (t, d), k, r = a_TxD.shape, idx_TxK.shape[1], table.shape[3 - d_axis]

    def host(a, idx, table_):
      z = torch.full((t * k, r), float("nan"))
      module._gather_dot_kernel[module.dot_grid(t * k, blocks)](
          _to_torch(torch, a), _to_torch(torch, idx), _to_torch(torch, table_), t * k, k, d, r,
          *module._strides(table.shape, d_axis), z, BLOCK_P=blocks.dot_block_p,
          BLOCK_D=blocks.dot_block_d, BLOCK_R=module._next_pow2(r))
      return z.numpy().reshape(t, k, r)

    return jax.pure_callback(host, jax.ShapeDtypeStruct((t, k, r), jnp.float32),
                             a_TxD, idx_TxK, table)

  def combine(c_TxKxR, idx_TxK, table, *, d_axis, out_dtype):
    (t, k, r), d = c_TxKxR.shape, table.shape[d_axis]

    def host(c, idx, table_):
      y = torch.full((t, d), float("nan"), dtype=_to_torch(torch, np.zeros((), out_dtype)).dtype)
      module._gather_combine_kernel[module.combine_grid(t, d, blocks)](
          _to_torch(torch, c), _to_torch(torch, idx), _to_torch(torch, table_), t, k, d, r,
          *module._strides(table.shape, d_axis), y, BLOCK_T=blocks.combine_block_t,
          BLOCK_D=blocks.combine_block_d, BLOCK_R=module._next_pow2(r))
      return _from_torch(torch, y)

    return jax.pure_callback(host, jax.ShapeDtypeStruct((t, d), out_dtype),
                             c_TxKxR.astype(jnp.float32), idx_TxK, table)

  return dot, combine


@pytest.mark.skipif(not IN_TRITON_INTERPRETER, reason="runs in a subprocess, TRITON_INTERPRET=1")
@pytest.mark.parametrize("case, dtype, activation", [
    (BASE, jnp.float32, jax.nn.gelu),
    (BASE, jnp.bfloat16, jax.nn.silu),
    (K1, jnp.float32, jax.nn.relu),
], ids=["base-f32", "base-bf16", "k1_r1-f32"])
def test_triton_kernels_in_interpreter_match_reference(case, dtype, activation):
  torch = pytest.importorskip("torch")
  fn = ga.make_gather_apply(*_interpreted_contractions(gpu_ga, torch, TRITON_BLOCKS))
  args = _inputs(case, dtype, seed=5)
  got = jax.jit(functools.partial(_vjp_all, fn, activation=activation))(*args)
  want = _reference_all(activation, *args)
  for name, g, w in zip(("y", "dx", "dw", "d_down", "d_up"), got, want):
    assert g.dtype == dtype, name
    assert_close(g, w, dtype)


@pytest.mark.skipif(IN_TRITON_INTERPRETER, reason="this process is the interpreter run")
def test_triton_kernels_under_triton_interpret():
  """Runs the test above in a fresh process: triton must be imported with TRITON_INTERPRET=1."""
  if importlib.util.find_spec("triton") is None or importlib.util.find_spec("torch") is None:
    pytest.skip("triton (and torch) not installed: the raw Triton kernels were not run")
  result = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
       "-k", "in_interpreter"],
      env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
      cwd=pathlib.Path(__file__).parents[1], check=False)
  assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
  assert "3 passed" in result.stdout, result.stdout[-2000:]


@pytest.mark.skipif(IN_TRITON_INTERPRETER, reason="the interpreter process does not compile")
@pytest.mark.parametrize("rank", [1, 3])
def test_triton_kernels_compile_for_hopper(rank, tmp_path, monkeypatch):
  """Both kernels, both row layouts, through Triton's compiler to sm_90 cubins (not run)."""
  triton = pytest.importorskip("triton")
  from triton.backends.compiler import GPUTarget  # pylint: disable=g-import-not-at-top
  from triton.compiler import ASTSource  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # importing jax_triton blanks it
  monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # as jax-triton compiles
  t, k, d, blocks = 4096, 32, 4096, gpu_ga.BlockSizes()
  kernels = {
      gpu_ga._gather_dot_kernel: (
          {"a_ptr": "*bf16", "z_ptr": "*fp32", "num_slots": t * k},
          {"BLOCK_P": blocks.dot_block_p, "BLOCK_D": blocks.dot_block_d}),
      gpu_ga._gather_combine_kernel: (
          {"c_ptr": "*fp32", "y_ptr": "*bf16", "num_tokens": t},
          {"BLOCK_T": blocks.combine_block_t, "BLOCK_D": blocks.combine_block_d}),
  }
  for kernel, (args, consts) in kernels.items():
    for d_axis in (1, 2):
      shape = (2**20, d, rank) if d_axis == 1 else (2**20, rank, d)
      stride_n, stride_d, stride_r = gpu_ga._strides(shape, d_axis)
      values = {"idx_ptr": "*i32", "table_ptr": "*bf16", "num_k": k, "d_size": d, "r_size": rank,
                "stride_n": stride_n, "stride_d": stride_d, "stride_r": stride_r, **args}
      signature, constexprs = {}, {(kernel.arg_names.index("BLOCK_R"),): gpu_ga._next_pow2(rank)}
      for i, name in enumerate(kernel.arg_names):
        if name in consts or name == "BLOCK_R" or values.get(name) == 1:  # jax-triton: 1 is constant
          signature[name] = "constexpr"
          constexprs.setdefault((i,), consts.get(name, 1))
        else:
          signature[name] = values[name] if isinstance(values[name], str) else "i32"
      compiled = triton.compile(ASTSource(kernel, signature, constexprs),
                                target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": blocks.num_warps})
      assert compiled.asm["cubin"], (kernel.fn.__name__, d_axis)
