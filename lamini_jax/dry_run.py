"""A dry run of a MoME run config: every array abstract, the phase-2 step compiled, bytes per device.

  python -m experiments.randomization --config configs/llama3_8b_mome.yaml --dry-run

`dry_run(cfg)` builds what a MoME run holds in phase 2 without allocating any of
it: the backbone parameters and the MoME router, balance and expert tables
(`jax.eval_shape` of the model's init) and the row optimizer state (`eval_shape`
of `mome.tuning.tuning_state`). It gives them the shardings the run gives them
(`sharding.shardings_for`: tables and row state split over `expert`, the rest
replicated) on a mesh of the config's shape, lowers and compiles the phase-2 step
(`mome.steps.make_tuning_step`, as `tune_mome` builds it) for abstract inputs,
and returns the bytes one device holds, with XLA's temporaries of one step
(`compiled.memory_analysis()`).

The inputs are a bound for any facts that fit the config: `mome.train.batch_size`
rows of `mome.train.seq_len` tokens (a real batch is only as wide as its longest
fact, rounded up to `length_bucket`) and, with answer-position training, room for
each fact's experts at `answer_tokens` positions (default seq_len - 1, the most a
fact can have; `steps.focus_rows` counts the real facts).

The backbone's shapes come from its `config.json` (a local directory or the hub
cache; nothing is downloaded), else from a named preset (`PRESETS`), said so.
Devices: a mesh of the config's shape on `jax.devices()` when there are enough;
else on CPU devices (`simulate_cpu_devices` gives the CPU as many before jax
starts; XLA:CPU's temporaries are its own compiler's, not an accelerator's);
else an `AbstractMesh`: the held bytes are exact, but nothing is compiled.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import re
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import huggingface_hub
import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P

from lamini_jax import config as config_lib
from lamini_jax import hf
from lamini_jax import model as model_lib
from lamini_jax import runs
from lamini_jax import sharding
from lamini_jax import train as train_lib
from lamini_jax.mome.anchors import ANCHOR
from lamini_jax.mome.config import MomeTuningConfig
from lamini_jax.mome.layer import BALANCE, ROUTER, TABLE
from lamini_jax.mome import sparse_optim
from lamini_jax.mome import steps as steps_lib
from lamini_jax.mome import tuning as mome_tuning
from lamini_jax_kernels import dispatch

GIB = 2**30
DEFAULT_DEVICE_MEMORY_GIB = 80.0

# Hub ids whose shapes are known without their config.json: the preset builds the same shapes.
PRESETS: dict[str, Callable[..., config_lib.ModelConfig]] = {
    "meta-llama/Meta-Llama-3-8B": config_lib.llama3_8b,
    "meta-llama/Meta-Llama-3-8B-Instruct": config_lib.llama3_8b,
    "meta-llama/Llama-3.1-8B": config_lib.llama3_8b,
    "meta-llama/Llama-3.1-8B-Instruct": config_lib.llama3_8b,
}


# ---------------------------------------------------------------------------------------------
# The backbone's shapes and the devices.


def backbone_config(spec: runs.ModelSpec) -> tuple[config_lib.ModelConfig, str]:
  """(the backbone's ModelConfig with the spec's dtypes, where its shapes came from).

  A local model directory's config.json, else the hub cache's copy of it (read
  offline), else the preset `PRESETS` names for the hub id.
  """
  dtypes = {"param_dtype": spec.param_dtype, "compute_dtype": spec.compute_dtype}
  local = pathlib.Path(runs.resolve_model_path(spec.path)).expanduser()
  if (local / hf.CONFIG_FILE).is_file():
    return hf.load_config(local, **dtypes), f"{local / hf.CONFIG_FILE}"
  cached = None
  if spec.path.count("/") == 1 and not spec.path.startswith((".", "/", "~")):
    cached = huggingface_hub.try_to_load_from_cache(spec.path, hf.CONFIG_FILE)
  if isinstance(cached, str):
    return hf.load_config(pathlib.Path(cached).parent, **dtypes), f"{cached} (hub cache)"
  preset = PRESETS.get(spec.path)
  if preset is None:
    raise FileNotFoundError(
        f"model.path={spec.path!r}: no {hf.CONFIG_FILE} in a local directory or the hub cache, and"
        f" no preset for it (presets: {', '.join(PRESETS)}); download the model or give a local"
        " directory")
  return preset(**dtypes), (f"{spec.path}'s {hf.CONFIG_FILE} is not available offline (no local"
                            f" directory, not in the hub cache): preset lamini_jax.config."
                            f"{preset.__name__}(), the same shapes")


def simulate_cpu_devices(count: int) -> bool:
  """Gives the CPU backend at least `count` devices if jax has not started yet; whether it has them.

  A device count already asked for (`XLA_FLAGS=--xla_force_host_platform_device_count=N`,
  `jax_num_cpu_devices`) of at least `count` is left as it is.
  """
  flag = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
  if max(jax.config.jax_num_cpu_devices, int(flag.group(1)) if flag else 1) >= count:
    return True
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:  # jax has started: its devices are what they are
    return False
  return True


def _mesh(spec: runs.MeshSpec) -> tuple[Mesh | AbstractMesh | None, str]:
  """(mesh, in words): on the default devices, else on CPU devices, else an AbstractMesh.

  None for one device: the library's unsharded path (`runs.MeshSpec.build`).
  """
  count, shape = spec.data * spec.expert, f"data {spec.data} x expert {spec.expert}"
  devices = jax.devices()
  platform = devices[0].platform
  if count == 1:
    return None, f"1 {platform} device (unsharded)"
  if count <= len(devices):
    return sharding.make_mesh(spec.data, spec.expert, devices), f"{shape} on {count} {platform} devices"
  cpus = jax.devices("cpu")
  if count <= len(cpus):
    return sharding.make_mesh(spec.data, spec.expert, cpus), (
        f"{shape} on {count} cpu devices (compiled by XLA:CPU: the default backend has"
        f" {len(devices)} {platform} device(s))")
  mesh = AbstractMesh((spec.data, spec.expert), (sharding.DATA, sharding.EXPERT),
                      axis_types=(AxisType.Auto, AxisType.Auto))
  return mesh, (f"{shape}, an AbstractMesh: {len(devices)} {platform} device(s) here, so nothing is"
                f" compiled (XLA_FLAGS=--xla_force_host_platform_device_count={count} simulates them)")


def _kernel(kernel: str, platform: str) -> tuple[str, str]:
  """(the gather-and-apply implementation to compile on `platform`, why)."""
  impl, why = dispatch.explain(kernel, platform)
  gpu_only, tpu_only = impl == "triton", impl == "pallas"
  if (gpu_only and platform not in dispatch.GPU_BACKENDS) or (tpu_only and platform != "tpu"):
    return "reference", f"mome.kernel={kernel} ({impl}) does not compile on {platform}: the reference"
  return impl, why


# ---------------------------------------------------------------------------------------------
# Abstract state.


def _nbytes(tree: Any) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs (its shard where it has a sharding)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.shape if leaf.sharding is None else leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def _placed(tree: Any, shardings: Any) -> Any:
  """`tree` as ShapeDtypeStructs carrying `shardings` (None: no sharding, one device)."""
  if shardings is None:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _replicated(tree: Any, mesh: Mesh | AbstractMesh | None) -> Any:
  return _placed(tree, None if mesh is None else jax.tree.map(lambda _: NamedSharding(mesh, P()), tree))


def _abstract(cfg: runs.RunConfig, model: model_lib.Transformer,
              mesh: Mesh | AbstractMesh | None) -> tuple[train_lib.TrainState, dict[str, Any]]:
  """(phase-2 train state, frozen variables): ShapeDtypeStructs with the run's shardings."""
  spec = cfg.mome
  boxed = model_lib.abstract_variables(model.clone(mome_mesh=None))
  variables = nn.meta.unbox(boxed)
  shardings = None if mesh is None else sharding.shardings_for(nn.get_partition_spec(boxed), mesh)
  of = lambda name: _placed(variables[name], None if shardings is None else shardings[name])
  tx = spec.train.optimizer.build()
  leaves = sparse_optim.trained_leaves(not spec.key_match)
  state = jax.eval_shape(lambda t: mome_tuning.tuning_state(t, tx, 0, None, leaves), variables[TABLE])
  table = of(TABLE)
  if mesh is not None:
    sharding.check_expert_sharded(table, mesh)
  row_shardings = None if mesh is None else sharding.row_shardings(state.opt_state, mesh)
  state = train_lib.TrainState(step=_replicated(state.step, mesh), trainable=table,
                               opt_state=_placed(state.opt_state, row_shardings),
                               rng=_replicated(state.rng, mesh))
  frozen = {"params": of("params"), ROUTER: of(ROUTER), BALANCE: of(BALANCE)}
  if spec.anchor.weight > 0:  # the pool at its largest: every window and every question
    a = spec.anchor
    pool = jax.ShapeDtypeStruct((a.windows + a.questions, a.seq_len), jnp.int32)
    experts = jax.ShapeDtypeStruct(pool.shape + (model.mome.slots,), jnp.int32)  # tune_mome's cached routes
    frozen[ANCHOR] = _replicated({"tokens": pool, "mask": pool.update(dtype=jnp.float32),
                                  "experts": experts}, mesh)
  return state, frozen


# ---------------------------------------------------------------------------------------------
# The dry run.


def dry_run(cfg: runs.RunConfig, *, device_memory_gib: float = DEFAULT_DEVICE_MEMORY_GIB,
            answer_tokens: int | None = None) -> dict[str, Any]:
  """The bytes one device holds while the config's phase-2 step runs; nothing of size is allocated.

  Returns a dict. Bytes one device holds: "backbone_bytes", "table_bytes",
  "row_state_bytes", "router_bytes" (router and balance), "input_bytes" (batch,
  anchor pool, step count, rng) and their sum "held_bytes"; XLA's "temp_bytes" of
  one step and "output_bytes" (outputs not aliased to the donated state); then
  "total_bytes" and "fits" (total <= `device_memory_gib`), and XLA's
  "xla_argument_bytes" (equal to "held_bytes" less "unread_bytes", the balance bias a
  one-layer step does not read); these five are None when nothing
  could be compiled. What was built: "model_config", "mome_config", "mome_layers",
  "parameters", "backbone_source", "mesh", "platform", "kernel", "batch",
  "anchor_rows", "answer_tokens", "rows", "trained_leaves", "lower_seconds",
  "compile_seconds", "host_peak_rss_bytes".
  """
  if cfg.method == "lora":
    raise ValueError("method=lora: the dry run covers MoME's phase-2 step (method mome or both)")
  if not device_memory_gib > 0:
    raise ValueError(f"device_memory_gib must be positive, got {device_memory_gib}")
  spec, train = cfg.mome, cfg.mome.train
  answer_tokens = train.seq_len - 1 if answer_tokens is None else answer_tokens
  if not 1 <= answer_tokens < train.seq_len:
    raise ValueError(f"answer_tokens={answer_tokens} must be in 1..{train.seq_len - 1}"
                     " (mome.train.seq_len - 1)")
  model_cfg, source = backbone_config(cfg.model)
  mesh, mesh_words = _mesh(cfg.mesh)
  compiles = not isinstance(mesh, AbstractMesh)
  platform = "none"
  if compiles:
    platform = (jax.devices()[0] if mesh is None else mesh.devices.flat[0]).platform
  kernel, why = _kernel(spec.kernel, platform) if compiles else ("reference", "nothing compiled")
  model = mome_tuning.mome_model(model_cfg, spec, mesh=mesh if compiles else None,
                                 gather_apply=dispatch.get_gather_apply(kernel))
  state, frozen = _abstract(cfg, model, mesh)
  batch = jax.ShapeDtypeStruct((train.batch_size, train.seq_len), jnp.int32)
  layer = model.mome
  # The first MoME layer's experts come with the batch, as tune_mome passes them (inputs.token_routes).
  experts = jax.ShapeDtypeStruct(batch.shape + (layer.slots,), jnp.int32)
  tokens, mask, experts = _replicated((batch, batch.update(dtype=jnp.float32), experts), mesh)
  written = spec.train_slots or layer.slots
  rows = min(train.batch_size * answer_tokens * written, layer.num_experts) + 1  # steps.focus_rows
  figures: dict[str, Any] = {
      "model_config": model_cfg, "mome_config": layer, "mome_layers": spec.layers,
      "parameters": sum(math.prod(a.shape) for a in jax.tree.leaves(frozen["params"])),
      "backbone_source": source, "mesh": mesh_words, "platform": platform, "kernel": f"{kernel} ({why})",
      "batch": (train.batch_size, train.seq_len),
      "anchor_rows": spec.anchor.batch_size if spec.anchor.weight > 0 else 0,
      "answer_tokens": answer_tokens, "rows": rows if spec.train_positions == "answer" else None,
      "trained_leaves": sparse_optim.trained_leaves(not spec.key_match),
      "backbone_bytes": _nbytes(frozen["params"]), "table_bytes": _nbytes(state.trainable),
      "row_state_bytes": _nbytes(state.opt_state),
      "router_bytes": _nbytes((frozen[ROUTER], frozen[BALANCE])),
      # With one MoME layer, whose routes come with the batch, the step never reads the
      # balance bias, and XLA drops an argument it does not read.
      "unread_bytes": _nbytes(frozen[BALANCE]) if len(spec.layers) == 1 else 0,
      "input_bytes": _nbytes((tokens, mask, experts, frozen.get(ANCHOR), state.step, state.rng)),
      "device_memory_bytes": int(device_memory_gib * GIB),
      "temp_bytes": None, "output_bytes": None, "total_bytes": None, "fits": None,
      "xla_argument_bytes": None, "lower_seconds": None, "compile_seconds": None,
  }
  figures["held_bytes"] = sum(figures[k] for k in HELD)
  if compiles:
    figures.update(_compile(model, spec, mesh, rows, (state, frozen, tokens, mask, experts)))
    if figures["temp_bytes"] is not None:
      figures["total_bytes"] = figures["held_bytes"] + figures["temp_bytes"] + figures["output_bytes"]
      figures["fits"] = figures["total_bytes"] <= figures["device_memory_bytes"]
  figures["host_peak_rss_bytes"] = _peak_rss()
  return figures


HELD = ("backbone_bytes", "table_bytes", "row_state_bytes", "router_bytes", "input_bytes")


def _compile(model: model_lib.Transformer, spec: MomeTuningConfig, mesh: Mesh | None, rows: int,
             args: tuple) -> dict[str, Any]:
  """Lowers and compiles the phase-2 step as `tune_mome` builds it; its times and memory_analysis."""
  anchor = spec.anchor if spec.anchor.weight > 0 else None
  step = steps_lib.make_tuning_step(model, spec.train.optimizer.build(), mesh, spec.margin,
                                    spec.train_positions, rows, anchor, train_down=not spec.key_match,
                                    train_slots=spec.train_slots)
  t0 = time.perf_counter()
  lowered = step.lower(*args)
  t1 = time.perf_counter()
  stats = lowered.compile().memory_analysis()
  out = {"lower_seconds": t1 - t0, "compile_seconds": time.perf_counter() - t1}
  if stats is not None:  # a backend may not report it
    out.update(temp_bytes=stats.temp_size_in_bytes, xla_argument_bytes=stats.argument_size_in_bytes,
               output_bytes=stats.output_size_in_bytes - stats.alias_size_in_bytes)
  return out


def _peak_rss() -> int:
  """Peak resident memory of this process so far, in bytes (Linux reports KiB, macOS bytes)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak if sys.platform == "darwin" else peak * 1024


def format_report(figures: dict[str, Any], name: str = "the config") -> str:
  """The dry run's figures as the table `--dry-run` prints."""
  f, m, layer = figures, figures["model_config"], figures["mome_config"]
  b, t = f["batch"]
  step = f"{b} x {t} fact tokens" + (f" + {f['anchor_rows']} anchor rows" if f["anchor_rows"] else "")
  if f["rows"] is not None:
    step += (f", up to {f['rows']:,} trained rows per MoME layer ({b} facts x {f['answer_tokens']}"
             " answer tokens x K + 1)")
  else:
    step += ", the experts of every position trained"
  lines = [
      f"Dry run of {name}: MoME phase 2, every array abstract (nothing of size allocated)",
      f"backbone  {f['backbone_source']}",
      f"          {m.num_layers} layers, width {m.hidden_size}, vocabulary {m.vocab_size:,}:"
      f" {f['parameters']:,} parameters in {m.param_dtype}, matmuls in {m.compute_dtype}",
      f"MoME      layers {list(f['mome_layers'])}: {layer.num_experts:,} experts of rank"
      f" {layer.expert_rank} each, K = {layer.num_heads} heads x {layer.top_k} = {layer.slots} per token",
      f"mesh      {f['mesh']}",
      f"kernel    {f['kernel']}",
      f"step      {step}; trains {' and '.join(f['trained_leaves'])}",
  ]
  if f["compile_seconds"] is not None:
    lines.append(f"          lowered in {f['lower_seconds']:.1f} s,"
                 f" compiled in {f['compile_seconds']:.1f} s")
  lines += [f"host      peak resident memory of this process {f['host_peak_rss_bytes'] / GIB:.2f} GiB",
            "", f"{'per device':<44} {'bytes':>16} {'GiB':>8}"]
  table = [("backbone parameters (replicated)", f["backbone_bytes"]),
           ("MoME expert tables (rows split)", f["table_bytes"]),
           ("row optimizer state (rows split)", f["row_state_bytes"]),
           ("router and balance (replicated)", f["router_bytes"]),
           ("batch, anchor pool, step, rng", f["input_bytes"]),
           (f"step temporaries (XLA:{f['platform'].upper()} memory_analysis)", f["temp_bytes"]),
           ("step outputs not donated", f["output_bytes"]),
           ("total", f["total_bytes"])]
  for label, value in table:
    figure = f"{'-':>16} {'-':>8}" if value is None else f"{value:>16,} {value / GIB:>8.2f}"
    lines.append(f"{label:<44} {figure}")
  memory = f"{f['device_memory_bytes'] / GIB:g} GiB"
  if f["fits"] is None:
    lines.append(f"fits in {memory} per device: unknown (nothing compiled)")
    return "\n".join(lines)
  spare = (f["device_memory_bytes"] - f["total_bytes"]) / GIB
  lines.append(f"fits in {memory} per device: "
               + (f"yes, {spare:.2f} GiB spare" if f["fits"] else f"NO, {-spare:.2f} GiB over"))
  read = f["held_bytes"] - f["unread_bytes"]
  same = "equal to" if f["xla_argument_bytes"] == read else "NOT equal to"
  lines.append(f"XLA's argument bytes per device ({f['xla_argument_bytes']:,}) are {same} the held bytes"
               f" above less the balance bias the step does not read ({read:,})")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line (`experiments.randomization --dry-run`).


def add_arguments(parser: argparse.ArgumentParser) -> None:
  group = parser.add_argument_group("dry run")
  group.add_argument("--dry-run", action="store_true",
                     help="build the MoME run abstractly, compile its phase-2 step, print the memory"
                     " per device and exit: no data, no weights")
  group.add_argument("--device-memory-gib", type=float, default=DEFAULT_DEVICE_MEMORY_GIB,
                     help="--dry-run: the memory of one device (default %(default)s GiB)")
  group.add_argument("--answer-tokens", type=int,
                     help="--dry-run: most trained tokens of one fact (default mome.train.seq_len - 1)")


def main(cfg: runs.RunConfig, args: argparse.Namespace, name: str) -> int:
  """Prints the dry run of `cfg`; before jax starts, a CPU gets as many devices as the mesh needs."""
  simulate_cpu_devices(cfg.mesh.data * cfg.mesh.expert)
  figures = dry_run(cfg, device_memory_gib=args.device_memory_gib, answer_tokens=args.answer_tokens)
  print(format_report(figures, name))
  return 0
