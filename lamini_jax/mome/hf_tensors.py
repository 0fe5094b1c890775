"""The MoME layers of a Hugging Face export: config.json's `mome` field and the tensors.

Names are `model.layers.<i>.mlp.mome.<name>` for the router (`query`, `keys1`, `keys2`),
the selection bias (`bias1`, `bias2`) and the table: `down` and `up` whole, or, in a sparse
export (`mome.stored_rows` set), the trained rows only with their expert ids `rows`
(`sparse_table`). The torch side is `lamini_jax/hf_mome`.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import numpy as np

from lamini_jax import hf
from lamini_jax.config import dtype_of
from lamini_jax.model import Transformer
from lamini_jax.mome import router as router_lib
from lamini_jax.mome import sparse_table
from lamini_jax.mome import table as table_lib
from lamini_jax.mome.config import MomeConfig
from lamini_jax.mome.layer import BALANCE, ROUTER, TABLE

MOME_TENSORS = {ROUTER: tuple(router_lib.ROUTER_AXES), BALANCE: tuple(router_lib.BALANCE_AXES),
                 TABLE: tuple(table_lib.TABLE_AXES)}
# The `mome` field of a MoME export's config.json: the layers and the `MomeConfig` fields of the
# layer, its width excepted (the backbone's hidden_size), `sub_keys` always written out.
MOME_HF_FIELDS = tuple(f.name for f in dataclasses.fields(MomeConfig) if f.name != "embed_dim")


def mome_hf_config(model: Transformer, tables: dict[int, dict[str, np.ndarray]] | None = None
                   ) -> dict[str, Any]:
  """The `mome` field of a MoME export's config.json (`tables`: the sparse tables by layer)."""
  spec = {name: getattr(model.mome, name) for name in MOME_HF_FIELDS}
  layers = sorted(model.mome_layers)
  stored = {} if tables is None else {"stored_rows": [len(tables[i][sparse_table.ROWS]) for i in layers]}
  return {"layers": layers, **spec, "sub_keys": list(model.mome.grid), **stored}


def mome_config_of(spec: dict[str, Any], hidden_size: int) -> MomeConfig:
  """The `MomeConfig` of a `mome` field; `sub_keys` is None when it is the default split."""
  fields = {name: spec[name] for name in MOME_HF_FIELDS if name in spec and name != "sub_keys"}
  sub_keys = tuple(spec["sub_keys"])
  try:
    default = MomeConfig(**fields, embed_dim=hidden_size)
  except ValueError:
    default = None
  if default is not None and default.grid == sub_keys:
    return default
  return MomeConfig(**fields, embed_dim=hidden_size, sub_keys=sub_keys)


def mome_tensor_name(layer: int, name: str) -> str:
  return f"model.layers.{layer}.mlp.mome.{name}"


def iter_mome_tensors(model: Transformer, variables: dict[str, Any], dtype: str,
                      tables: dict[int, dict[str, np.ndarray]] | None = None):
  """(HF name, numpy tensor) of every MoME layer's router, balance bias and table.

  With `tables` (`sparse_table.sparse` by layer) the stored rows and their ids stand for
  the whole table.
  """
  np_dtype = np.dtype(dtype_of(dtype))
  for i in sorted(model.mome_layers):
    for collection, names in MOME_TENSORS.items():
      if collection == TABLE and tables is not None:
        for name, arr in tables[i].items():
          yield mome_tensor_name(i, name), arr if name == sparse_table.ROWS else arr.astype(np_dtype)
        continue
      for name in names:
        arr = np.asarray(jax.device_get(variables[collection][f"layers_{i}"]["mome"][name]))
        yield mome_tensor_name(i, name), arr.astype(np_dtype)


def _shapes(cfg: MomeConfig) -> dict[str, dict[str, tuple[int, ...]]]:
  return {ROUTER: router_lib.router_shapes(cfg),
          BALANCE: {"bias1": (cfg.num_heads, cfg.grid[0]), "bias2": (cfg.num_heads, cfg.grid[1])},
          TABLE: table_lib.table_shapes(cfg)}


def read_mome_tensors(ckpt: hf.Checkpoint, model: Transformer, spec: dict[str, Any],
                      model_dir: pathlib.Path) -> dict[str, Any]:
  """The router, balance and table collections (float32 numpy) of every MoME layer.

  A sparse table comes back whole, its other rows zero (`sparse_table.dense`).
  """
  shapes = _shapes(model.mome)
  layers = sorted(model.mome_layers)
  stored = dict(zip(layers, spec["stored_rows"])) if "stored_rows" in spec else None
  wanted = {}
  for i in layers:
    for collection, names in MOME_TENSORS.items():
      if collection == TABLE and stored is not None:
        m = stored[i]
        names = {sparse_table.ROWS: (m,), **{n: (m, *shapes[TABLE][n][1:]) for n in names}}
      else:
        names = {n: tuple(shapes[collection][n]) for n in names}
      for name, shape in names.items():
        wanted[(collection, i, name)] = shape
  missing = [mome_tensor_name(i, n) for (_, i, n) in wanted if mome_tensor_name(i, n) not in ckpt]
  if missing:
    raise hf.CheckpointError(f"{model_dir}: export is missing tensor {missing[0]!r} "
                             f"({len(missing)} missing in all)")
  out: dict[str, Any] = {c: {f"layers_{i}": {"mome": {}} for i in layers} for c in MOME_TENSORS}
  for (collection, i, name), shape in wanted.items():
    arr = ckpt.read(mome_tensor_name(i, name), shape)
    out[collection][f"layers_{i}"]["mome"][name] = arr if name == sparse_table.ROWS else np.asarray(arr, np.float32)
  if stored is not None:
    for i in layers:
      where = f"{model_dir} layer {i}"
      try:
        out[TABLE][f"layers_{i}"]["mome"] = sparse_table.dense(out[TABLE][f"layers_{i}"]["mome"],
                                                               shapes[TABLE], where)
      except ValueError as e:
        raise hf.CheckpointError(str(e)) from None
  return out
