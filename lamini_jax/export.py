"""Memory-tuned models to Hugging Face: merged weights, a PEFT adapter, or MoME with its code.

    python -m lamini_jax.export --checkpoint runs/randomization --adapter lora-random \
        --out exports/merged --format merged
    python -m lamini_jax.export --checkpoint runs/randomization/checkpoints/lora-real \
        --out exports/adapter --format peft [--base-model meta-llama/Llama-3.1-8B]
    python -m lamini_jax.export --checkpoint runs/mome --adapter mome-random \
        --out exports/mome --format mome [--max-shard-bytes 2000000000]

Formats:
  merged  the LoRA adapters folded into the base weights: a plain Llama / Mistral
          directory (config, generation config, safetensors, tokenizer) that
          `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads.
  peft    `adapter_config.json` + `adapter_model.safetensors` for
          `peft.PeftModel.from_pretrained(base, DIR)`; the base model's path or hub
          id is recorded as `base_model_name_or_path`.
  mome    the backbone, the router, selection bias and expert table of every MoME
          layer, and the PyTorch modeling code (`lamini_jax/hf_mome`), loaded by
          `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`.
          Of each table only the trained rows (`up` not all zero) with their expert
          ids (`lamini_jax.mome.sparse_table`), unless `--whole-table`. The run's fact
          registry, where `lamini_jax.facts` keeps one, as `lamini_facts.jsonl`.
          Files above `--max-shard-bytes` are split with a `model.safetensors.index.json`.

Every export records where it came from (run directory, label, step, base
model) in `lamini_export.json`. `load_export` reads a merged, PEFT or MoME
export back into lamini-jax.

PEFT layout: our adapter of a projection is A [in dims..., R] and B [R, out
dims...] (`lamini_jax.lora`); PEFT's `lora_A.weight` is A flattened to [in, R]
and transposed, `lora_B.weight` is B flattened to [R, out] and transposed, with
HF's flattening of heads (`hf.to_hf`). PEFT's scale `lora_alpha / r` (no rsLoRA)
equals ours, `alpha / rank`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shutil
import sys
from typing import Any, Sequence

import jax
import numpy as np

from lamini_jax.checkpoint import Checkpointer
from lamini_jax.config import ModelConfig, dtype_of
from lamini_jax import hf
from lamini_jax import hf_mome
from lamini_jax.lora import LoraConfig
from lamini_jax.model import PROJECTIONS, Transformer, merge_lora, module_of
from lamini_jax.mome.layer import TABLE
from lamini_jax.mome import hf_tensors
from lamini_jax.mome import registry
from lamini_jax.mome import sparse_table
from lamini_jax import runs

FORMATS = ("merged", "peft", "mome")
EXPORT_FILE = "lamini_export.json"
FACTS_FILE = "lamini_facts.jsonl"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_HF_MODULE = {"attn": "self_attn", "mlp": "mlp"}


class ExportError(ValueError):
  """A checkpoint, format or output directory that cannot be exported, with the reason."""


@dataclasses.dataclass(frozen=True)
class Source:
  """Where an export comes from; written to `lamini_export.json`."""

  base_model: str  # the backbone's local directory or hub id
  run_dir: str | None = None
  label: str | None = None
  step: int | None = None


# ---------------------------------------------------------------------------
# Tensor names and layouts.


def hf_proj_name(layer: int, proj: str) -> str:
  """`model.layers.<i>.self_attn.q_proj` for layer i and our projection name."""
  return f"model.layers.{layer}.{_HF_MODULE[module_of(proj)]}.{proj}_proj"


def _n_in(proj: str) -> int:
  eqn = PROJECTIONS[proj][0]
  w_spec, out = eqn.split("->")[0].split(",")[1], eqn.split("->")[1]
  return sum(1 for c in w_spec if c not in out)


def _layers_of(tree: dict[str, Any]) -> list[int]:
  return sorted(int(name.split("_")[1]) for name in tree)


def peft_tensors(lora_vars: dict[str, Any], dtype: str = "float32") -> dict[str, np.ndarray]:
  """PEFT `lora_A.weight` [R, in] and `lora_B.weight` [out, R] of every adapter."""
  np_dtype = np.dtype(dtype_of(dtype))
  out = {}
  for i in _layers_of(lora_vars):
    for projs in lora_vars[f"layers_{i}"].values():
      for proj, ab in projs.items():
        a = np.asarray(jax.device_get(ab["a"]), np.float32)
        b = np.asarray(jax.device_get(ab["b"]), np.float32)
        rank = a.shape[-1]
        name = f"base_model.model.{hf_proj_name(i, proj)}"
        out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, rank).T).astype(np_dtype)
        out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.reshape(rank, -1).T).astype(np_dtype)
  return out


def lora_from_peft(tensors: dict[str, np.ndarray], cfg: ModelConfig,
                   lora: LoraConfig) -> dict[str, Any]:
  """The `"lora"` collection of PEFT adapter tensors (the inverse of `peft_tensors`)."""
  out: dict[str, Any] = {}
  for i in range(cfg.num_layers):
    for proj in lora.targets:
      name = f"base_model.model.{hf_proj_name(i, proj)}"
      keys = (f"{name}.lora_A.weight", f"{name}.lora_B.weight")
      missing = [k for k in keys if k not in tensors]
      if missing:
        raise ExportError(f"{ADAPTER_WEIGHTS} is missing {missing[0]!r} (target {proj!r} of layer {i})")
      dims = tuple(getattr(cfg, d) for d in PROJECTIONS[proj][1])
      n_in = _n_in(proj)
      a = np.asarray(tensors[keys[0]], np.float32).T.reshape(dims[:n_in] + (lora.rank,))
      b = np.asarray(tensors[keys[1]], np.float32).T.reshape((lora.rank,) + dims[n_in:])
      out.setdefault(f"layers_{i}", {}).setdefault(module_of(proj), {})[proj] = {"a": a, "b": b}
  return out


def adapter_config(lora: LoraConfig, base_model: str) -> dict[str, Any]:
  """`adapter_config.json` of a PEFT LoRA adapter with our rank, alpha and targets.

  Only fields that every peft release since 0.13 knows are written; the rest take
  peft's defaults.
  """
  return {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model,
      "r": lora.rank,
      "lora_alpha": lora.alpha,
      "use_rslora": False,
      "use_dora": False,
      "lora_dropout": 0.0,
      "bias": "none",
      "fan_in_fan_out": False,
      "init_lora_weights": True,
      "inference_mode": True,
      "target_modules": [f"{proj}_proj" for proj in lora.targets],
      "modules_to_save": None,
      "layers_to_transform": None,
      "layers_pattern": None,
      "rank_pattern": {},
      "alpha_pattern": {},
      "revision": None,
  }


# ---------------------------------------------------------------------------
# Writing exports.


def _prepare_out(out_dir, overwrite: bool) -> pathlib.Path:
  out = pathlib.Path(out_dir)
  if out.exists() and not out.is_dir():
    raise ExportError(f"--out {out} is a file; give a directory")
  if out.is_dir() and any(out.iterdir()):
    if not overwrite:
      raise ExportError(f"--out {out} is not empty; choose a new directory or pass --overwrite")
    if not (out / EXPORT_FILE).is_file():
      raise ExportError(f"--out {out} holds files that are not a lamini-jax export ({EXPORT_FILE} "
                        "missing); --overwrite only replaces an earlier export")
    shutil.rmtree(out)
  out.mkdir(parents=True, exist_ok=True)
  return out


def _write_record(out: pathlib.Path, fmt: str, source: Source | None, extra: dict[str, Any]) -> None:
  record = {"format": fmt, **(dataclasses.asdict(source) if source else {}), **extra}
  (out / EXPORT_FILE).write_text(json.dumps(record, indent=2) + "\n")


def export_merged(out_dir, cfg: ModelConfig, params: dict[str, Any], lora_vars: dict[str, Any],
                  lora: LoraConfig, *, tokenizer_dir=None, source: Source | None = None,
                  dtype: str | None = None, max_shard_bytes: int = 4 * 2**30,
                  overwrite: bool = False) -> pathlib.Path:
  """Folds the adapters into the weights and writes a plain Hugging Face directory."""
  out = _prepare_out(out_dir, overwrite)
  merged = merge_lora(params, lora_vars, lora)
  hf.save_pretrained(out, merged, cfg, tokenizer_dir=tokenizer_dir, dtype=dtype,
                     max_shard_bytes=max_shard_bytes)
  _write_record(out, "merged", source, {"lora": dataclasses.asdict(lora)})
  return out


def export_peft(out_dir, lora_vars: dict[str, Any], lora: LoraConfig, *, base_model: str,
                tokenizer_dir=None, source: Source | None = None, dtype: str = "float32",
                overwrite: bool = False) -> pathlib.Path:
  """Writes `adapter_config.json` and `adapter_model.safetensors` for `peft`."""
  out = _prepare_out(out_dir, overwrite)
  (out / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(lora, base_model), indent=2) + "\n")
  hf.write_safetensors(out / ADAPTER_WEIGHTS, peft_tensors(lora_vars, dtype))
  if tokenizer_dir is not None:
    hf.copy_tokenizer(tokenizer_dir, out)
  _write_record(out, "peft", source, {"lora": dataclasses.asdict(lora)})
  return out


def export_mome(out_dir, model: Transformer, variables: dict[str, Any], *, tokenizer_dir=None,
                source: Source | None = None, dtype: str | None = None,
                max_shard_bytes: int = 4 * 2**30, overwrite: bool = False,
                whole_table: bool = False, facts_file: pathlib.Path | None = None) -> pathlib.Path:
  """Writes the backbone, every MoME layer and the modeling code for `trust_remote_code`.

  Of each table only the trained rows unless `whole_table`; `facts_file` (a fact registry)
  is copied in as `lamini_facts.jsonl`.
  """
  if model.mome is None or not model.mome_layers:
    raise ExportError("export_mome needs a Transformer with MoME layers (mome and mome_layers)")
  if model.lora is not None:
    raise ExportError("export_mome: the model also has LoRA adapters; merge them into params first")
  cfg = model.cfg
  dtype = dtype or cfg.param_dtype
  model_type, _, model_cls = hf_mome.CLASSES[cfg.architecture]
  out = _prepare_out(out_dir, overwrite)
  tables = None if whole_table else {
      i: sparse_table.sparse(variables[TABLE][f"layers_{i}"]["mome"]) for i in model.mome_layers}
  extra_config = {"model_type": model_type, "architectures": [model_cls],
                  "auto_map": hf_mome.auto_map(cfg.architecture), "mome": hf_tensors.mome_hf_config(model, tables)}
  hf.save_pretrained(out, variables["params"], cfg, tokenizer_dir=tokenizer_dir, dtype=dtype,
                     max_shard_bytes=max_shard_bytes,
                     extra_tensors=hf_tensors.iter_mome_tensors(model, variables, dtype, tables),
                     extra_config=extra_config)
  for path in (*hf_mome.FILES, *([] if facts_file is None else [facts_file])):
    shutil.copyfile(path, out / (FACTS_FILE if path == facts_file else path.name))
  _write_record(out, "mome", source, {"table": "whole" if whole_table else "trained rows",
                                      "facts": None if facts_file is None else FACTS_FILE})
  return out


# ---------------------------------------------------------------------------
# Reading exports back into lamini-jax.


def _base_config(model_dir: pathlib.Path, hf_config: dict[str, Any], param_dtype: str) -> ModelConfig:
  base_type = {v[0]: k for k, v in hf_mome.CLASSES.items()}.get(hf_config.get("model_type"))
  fixed = {**hf_config, "model_type": base_type or hf_config.get("model_type")}
  try:
    return ModelConfig.from_hf_dict(fixed, source=str(model_dir / hf.CONFIG_FILE)).replace(
        param_dtype=param_dtype)
  except (TypeError, ValueError) as e:
    raise hf.CheckpointError(str(e)) from None


def _load_mome_export(model_dir: pathlib.Path, hf_config: dict[str, Any],
                      param_dtype: str) -> tuple[Transformer, dict[str, Any]]:
  cfg = _base_config(model_dir, hf_config, param_dtype)
  spec = hf_config.get("mome")
  if not isinstance(spec, dict):
    raise hf.CheckpointError(f"{model_dir / hf.CONFIG_FILE}: a MoME export needs a 'mome' field")
  model = Transformer(cfg, mome=hf_tensors.mome_config_of(spec, cfg.hidden_size),
                      mome_layers=tuple(spec["layers"]))
  ckpt = hf.Checkpoint(model_dir, cfg)
  layout = hf.hf_layout(cfg)
  missing = [k for k in layout if k not in ckpt]
  if missing:
    raise hf.CheckpointError(f"{model_dir}: export is missing tensor {missing[0]!r} "
                             f"({len(missing)} missing in all)")
  np_dtype = np.dtype(dtype_of(param_dtype))
  params: dict[str, Any] = {}
  for name, (path, shape) in layout.items():
    arr = hf.to_ours(ckpt.read(name, hf.hf_shape(shape, path, cfg)), path, shape).astype(np_dtype)
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = arr
  mome = hf_tensors.read_mome_tensors(ckpt, model, spec, model_dir)
  variables = jax.tree.map(jax.device_put, {"params": params, **mome})
  return model, variables


def load_export(path, param_dtype: str = "float32") -> tuple[Transformer, dict[str, Any], pathlib.Path]:
  """(model, variables, directory) of a merged, PEFT or MoME export (or any HF Llama/Mistral).

  A PEFT export loads its base model from `base_model_name_or_path` and gives the
  adapters as the `"lora"` collection.
  """
  model_dir = hf.resolve_model_dir(path)
  if (model_dir / ADAPTER_CONFIG).is_file():
    ac = json.loads((model_dir / ADAPTER_CONFIG).read_text())
    lora = LoraConfig(rank=ac["r"], alpha=float(ac["lora_alpha"]),
                      targets=tuple(t.removesuffix("_proj") for t in ac["target_modules"]))
    cfg, params, _ = hf.load_pretrained(ac["base_model_name_or_path"], param_dtype=param_dtype)
    tensors = hf.read_safetensors(model_dir / ADAPTER_WEIGHTS)
    lora_vars = jax.tree.map(jax.device_put, lora_from_peft(tensors, cfg, lora))
    return Transformer(cfg, lora=lora), {"params": params, "lora": lora_vars}, model_dir
  config_path = model_dir / hf.CONFIG_FILE
  hf_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
  if "mome" in hf_config:
    model, variables = _load_mome_export(model_dir, hf_config, param_dtype)
    return model, variables, model_dir
  cfg, params, _ = hf.load_pretrained(model_dir, param_dtype=param_dtype)
  return Transformer(cfg), {"params": params}, model_dir


# ---------------------------------------------------------------------------
# Run directories.


def resolve_checkpoint(checkpoint, adapter: str | None) -> tuple[runs.RunDir, str]:
  """(run directory, label) of `RUN_DIR` + `adapter`, or of `RUN_DIR/checkpoints/LABEL`."""
  try:
    run, label = runs.run_dir_of_checkpoint(checkpoint, adapter)
    return run, run.resolve_label(label)
  except (FileNotFoundError, ValueError) as e:
    raise ExportError(f"--checkpoint: {e}") from None


def _check_format(fmt: str, mome_run: bool, run_dir: pathlib.Path, label: str) -> None:
  if fmt not in FORMATS:
    raise ExportError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
  if mome_run and fmt != "mome":
    raise ExportError(
        f"{run_dir} label {label!r} is a MoME run: its expert table cannot be "
        f"{'folded into the weights' if fmt == 'merged' else 'written as a PEFT LoRA adapter'}; "
        "use --format mome")
  if not mome_run and fmt == "mome":
    raise ExportError(f"{run_dir} label {label!r} holds LoRA adapters, not a MoME model; "
                      "use --format merged or --format peft")


def _base_model_id(path: str) -> str:
  """A local directory as an absolute path; a hub id as given."""
  local = pathlib.Path(path).expanduser()
  return str(local.resolve()) if local.exists() else path


def export_checkpoint(checkpoint, out_dir, fmt: str, *, adapter: str | None = None,
                      base_model: str | None = None, dtype: str | None = None,
                      max_shard_bytes: int = 4 * 2**30, overwrite: bool = False,
                      whole_table: bool = False) -> pathlib.Path:
  """Exports one trained model of a run directory (`experiments.randomization`, `tune`).

  `base_model` overrides the base model id recorded in a PEFT adapter (e.g. the
  hub id of a backbone trained from a local copy). A MoME model exports its committed
  memory (`lamini_jax.facts` edits included) and, where one is kept, its fact registry.
  """
  run, label = resolve_checkpoint(checkpoint, adapter)
  _check_format(fmt, run.is_mome(label), run.path, label)
  if dtype is not None:
    dtype_of(dtype, "--dtype")
  trained = runs.load_trained(run.path, label)
  ckpt = Checkpointer(run.paths(label).checkpoints, every=0)
  step = ckpt.latest_step()
  ckpt.close()
  model_path = runs.resolve_model_path(trained.config.model.path)
  source = Source(base_model=_base_model_id(model_path), run_dir=str(run.path.resolve()), label=label,
                  step=step)
  model, variables, model_dir = trained.model, trained.variables, trained.backbone.model_dir
  cfg, params = trained.backbone.cfg, trained.backbone.params
  if fmt == "mome":
    store = run.paths(label).store
    manifest = registry.read_manifest(store)
    return export_mome(out_dir, model, variables, tokenizer_dir=model_dir, source=source, dtype=dtype,
                       max_shard_bytes=max_shard_bytes, overwrite=overwrite, whole_table=whole_table,
                       facts_file=None if manifest is None else store / manifest.registry)
  if fmt == "merged":
    return export_merged(out_dir, cfg, params, variables["lora"], model.lora, tokenizer_dir=model_dir,
                         source=source, dtype=dtype, max_shard_bytes=max_shard_bytes,
                         overwrite=overwrite)
  return export_peft(out_dir, variables["lora"], model.lora, base_model=base_model or source.base_model,
                     tokenizer_dir=model_dir, source=source, dtype=dtype or "float32",
                     overwrite=overwrite)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m lamini_jax.export",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", required=True,
                      help="a run directory (with --adapter LABEL) or RUN_DIR/checkpoints/LABEL")
  parser.add_argument("--adapter", help="which trained model of the run (e.g. lora-random)")
  parser.add_argument("--out", required=True, type=pathlib.Path, help="the export directory")
  parser.add_argument("--format", required=True, choices=FORMATS)
  parser.add_argument("--base-model", help="peft: base model id to record (default: the run's backbone)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                      help="weights dtype (default: the run's param_dtype; float32 for peft)")
  parser.add_argument("--max-shard-bytes", type=int, default=4 * 2**30,
                      help="split the safetensors into files of at most this size (with an index)")
  parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
  parser.add_argument("--whole-table", action="store_true",
                      help="mome: write every row of the expert table (default: only the trained rows)")
  args = parser.parse_args(argv)
  try:
    out = export_checkpoint(args.checkpoint, args.out, args.format, adapter=args.adapter,
                            base_model=args.base_model, dtype=args.dtype,
                            max_shard_bytes=args.max_shard_bytes, overwrite=args.overwrite,
                            whole_table=args.whole_table)
  except (ExportError, hf.CheckpointError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.format} export to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
