"""Hugging Face checkpoints: import and export of Llama / Mistral directories.

Import streams tensor by tensor from `model.safetensors` or a sharded
`model.safetensors.index.json`: each tensor is read from a memory map, laid out
for our modules, cast and placed on its device (or mesh sharding) before the
next is read, so host memory never holds a second copy of the model. A tied
embedding may be stored as `model.embed_tokens.weight`, through a safetensors
`__metadata__` alias, or as `lm_head.weight` alone (see `Checkpoint`). Export
writes a directory that `transformers.AutoModelForCausalLM.from_pretrained`
loads offline.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any, Iterator

import huggingface_hub
import jax
import numpy as np
import safetensors
import safetensors.numpy
import tqdm
import transformers

from lamini_jax.config import ModelConfig, dtype_of
from lamini_jax.model import PROJECTIONS, module_of

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json")
EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
  """A checkpoint directory or file that cannot be used, with the reason."""


# ---------------------------------------------------------------------------
# safetensors files, through the `safetensors` package.
#
# We read with `safe_open(framework="numpy")`: it memory-maps the file and
# `get_tensor` copies out one tensor at a time, which we lay out, cast and
# `device_put` to its sharding before reading the next. In safetensors 0.8 the
# numpy framework maps BF16 to `ml_dtypes.bfloat16` both ways (measured: a BF16
# tensor written by torch reads back bit-exact, and `save_file` writes
# `ml_dtypes.bfloat16` as BF16), so no uint16 view is needed. We do not use
# `framework="flax"`: it would put every tensor whole on the default device
# before we could lay it out and shard it.


def _open(path: pathlib.Path):
  try:
    return safetensors.safe_open(path, framework="numpy")
  except safetensors.SafetensorError as e:
    raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def _get(st, path: pathlib.Path, name: str) -> np.ndarray:
  try:
    return st.get_tensor(name)
  except (safetensors.SafetensorError, TypeError, ValueError) as e:
    raise CheckpointError(f"{path}: cannot read tensor {name!r}: {e}") from None


def read_safetensors(path: os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of one safetensors file (for small files such as adapters)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise CheckpointError(f"{path} not found")
  st = _open(path)
  return {name: _get(st, path, name) for name in st.keys()}


def write_safetensors(path: os.PathLike, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
  """Writes numpy tensors (ml_dtypes bfloat16 included) to one safetensors file."""
  path = pathlib.Path(path)
  # `save_file` writes from each array's data pointer, so arrays must be contiguous.
  contiguous = {name: np.ascontiguousarray(arr) for name, arr in tensors.items()}
  tmp = path.with_name(path.name + ".tmp")
  safetensors.numpy.save_file(contiguous, tmp, metadata=metadata or {"format": "pt"})
  os.replace(tmp, path)


class Checkpoint:
  """The tensors of a model directory (`model.safetensors` or a sharded index).

  A name resolves to a stored tensor, or through a file's `__metadata__` alias
  (safetensors' shared-tensor de-duplication writes `{removed: kept}`), or, when
  `cfg.tie_word_embeddings`, `model.embed_tokens.weight` resolves to
  `lm_head.weight` if that is the only copy (`transformers` ties both ways).
  Files are memory-mapped; `read` copies out one tensor at a time.
  """

  def __init__(self, model_dir: os.PathLike, cfg: ModelConfig | None = None):
    self.model_dir = pathlib.Path(model_dir)
    index, single = self.model_dir / INDEX_FILE, self.model_dir / SINGLE_FILE
    if index.is_file():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
      listed = {name: self.model_dir / f for name, f in weight_map.items()}
    elif single.is_file():
      listed = None
    else:
      found = sorted(p.name for p in self.model_dir.iterdir())
      raise CheckpointError(
          f"{self.model_dir}: no {SINGLE_FILE} or {INDEX_FILE} (found: {', '.join(found) or 'nothing'}); "
          "lamini-jax reads safetensors checkpoints only")
    self._opened: dict[pathlib.Path, Any] = {}
    for f in sorted(set(listed.values())) if listed is not None else [single]:
      if not f.is_file():
        raise CheckpointError(f"{index} lists {f.name}, which is missing from {self.model_dir}")
      self._opened[f] = _open(f)
    self.files = {name: f for f, st in self._opened.items() for name in st.keys()}
    for name, f in (listed or {}).items():
      if self.files.get(name) != f:
        raise CheckpointError(f"{index} lists tensor {name!r} in {f.name}, which does not hold it")
    self.aliases: dict[str, str] = {}
    for f, st in self._opened.items():
      for alias, kept in (st.metadata() or {}).items():
        if alias not in self.files and self.files.get(kept) == f:
          self.aliases[alias] = kept
    if cfg is not None and cfg.tie_word_embeddings and EMBED not in self and LM_HEAD in self:
      self.aliases[EMBED] = self.aliases.get(LM_HEAD, LM_HEAD)

  def __contains__(self, name: str) -> bool:
    return name in self.files or name in self.aliases

  def keys(self) -> list[str]:
    """The names of the stored tensors (aliases not included)."""
    return list(self.files)

  def _source(self, name: str) -> tuple[pathlib.Path, str]:
    stored = self.aliases.get(name, name)
    if stored not in self.files:
      raise CheckpointError(f"{self.model_dir}: checkpoint is missing tensor {name!r}")
    return self.files[stored], stored

  def shape(self, name: str) -> tuple[int, ...]:
    file, stored = self._source(name)
    return tuple(self._opened[file].get_slice(stored).get_shape())

  def read(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Tensor `name` as stored, after checking its shape against `shape` if given."""
    file, stored = self._source(name)
    if shape is not None and self.shape(name) != tuple(shape):
      via = f" (stored as {stored!r})" if stored != name else ""
      raise CheckpointError(f"{file}: tensor {name!r}{via} has shape {list(self.shape(name))}, "
                            f"expected {list(shape)} from config.json")
    return _get(self._opened[file], file, stored)

  def __enter__(self) -> Checkpoint:
    return self

  def __exit__(self, *exc) -> None:
    self._opened.clear()  # drops the memory maps


# ---------------------------------------------------------------------------
# Locating a model: a local directory or a hub id.


def resolve_model_dir(name_or_path: str | os.PathLike) -> pathlib.Path:
  """A local model directory, downloading a hub id (`org/name`) when needed."""
  path = pathlib.Path(name_or_path).expanduser()
  if path.exists():
    if not path.is_dir():
      raise CheckpointError(f"--model {str(name_or_path)!r} is a file; give the model's directory")
    return path
  text = str(name_or_path)
  looks_local = text.startswith((".", "/", "~")) or text.count("/") != 1
  if looks_local:
    raise CheckpointError(f"model directory {text!r} does not exist")
  try:
    local = huggingface_hub.snapshot_download(
        text, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"])
  except Exception as e:  # offline, unknown repo, gated repo: all end the same way for a user
    raise CheckpointError(
        f"{text!r} is not a local directory and could not be fetched from the Hugging Face hub "
        f"(offline or not in the local cache?): {type(e).__name__}: {e}") from None
  return pathlib.Path(local)


def load_config(model_dir: os.PathLike, **overrides) -> ModelConfig:
  path = pathlib.Path(model_dir) / CONFIG_FILE
  if not path.is_file():
    raise CheckpointError(f"{path} not found: a Hugging Face model directory needs {CONFIG_FILE}")
  try:
    hf = json.loads(path.read_text())
  except ValueError as e:
    raise CheckpointError(f"{path}: invalid JSON: {e}") from None
  try:
    cfg = ModelConfig.from_hf_dict(hf, source=str(path))
  except (TypeError, ValueError) as e:
    raise CheckpointError(str(e)) from None
  return cfg.replace(**overrides) if overrides else cfg


# ---------------------------------------------------------------------------
# Name and layout mapping. HF stores projections as [out, in] matrices; ours keep
# the einsum layout of `model.PROJECTIONS` (input letters first).


def _proj_shape(cfg: ModelConfig, proj: str) -> tuple[tuple[int, ...], int]:
  eqn, dims, _ = PROJECTIONS[proj]
  w_spec, out = eqn.split("->")[0].split(",")[1], eqn.split("->")[1]
  n_in = sum(1 for c in w_spec if c not in out)
  return tuple(getattr(cfg, d) for d in dims), n_in


def hf_layout(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """HF tensor name -> (our parameter path, our shape)."""
  d = cfg.hidden_size
  out: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {
      EMBED: (("embedding",), (cfg.vocab_size, d)),
      "model.norm.weight": (("final_norm", "scale"), (d,)),
  }
  if not cfg.tie_word_embeddings:
    out[LM_HEAD] = (("lm_head",), (d, cfg.vocab_size))
  hf_module = {"attn": "self_attn", "mlp": "mlp"}
  for i in range(cfg.num_layers):
    layer = f"layers_{i}"
    out[f"model.layers.{i}.input_layernorm.weight"] = ((layer, "input_norm", "scale"), (d,))
    out[f"model.layers.{i}.post_attention_layernorm.weight"] = ((layer, "post_attn_norm", "scale"), (d,))
    for proj in PROJECTIONS:
      shape, _ = _proj_shape(cfg, proj)
      name = f"model.layers.{i}.{hf_module[module_of(proj)]}.{proj}_proj.weight"
      out[name] = ((layer, module_of(proj), proj, "kernel"), shape)
  return out


def hf_shape(ours: tuple[int, ...], path: tuple[str, ...], cfg: ModelConfig) -> tuple[int, ...]:
  """The HF shape of our parameter at `path` whose shape is `ours`."""
  if path[-1] == "kernel":
    _, n_in = _proj_shape(cfg, path[-2])
    return (int(np.prod(ours[n_in:])), int(np.prod(ours[:n_in])))
  if path == ("lm_head",):
    return ours[::-1]
  return ours


def to_ours(hf_arr: np.ndarray, path: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
  if path[-1] == "kernel" or path == ("lm_head",):
    return hf_arr.T.reshape(shape)
  return hf_arr


def to_hf(arr: np.ndarray, path: tuple[str, ...], cfg: ModelConfig) -> np.ndarray:
  if path[-1] == "kernel" or path == ("lm_head",):
    return np.ascontiguousarray(arr.reshape(hf_shape(arr.shape, path, cfg)[::-1]).T)
  return arr


def load_params(model_dir: os.PathLike, cfg: ModelConfig, shardings: Any = None,
                progress: bool = False) -> dict[str, Any]:
  """Reads the weights into our parameter tree, one tensor at a time.

  `shardings`, if given, is a tree of `jax.sharding.Sharding` matching the
  parameters; each tensor goes straight to its sharding.
  """
  model_dir = pathlib.Path(model_dir)
  layout = hf_layout(cfg)
  with Checkpoint(model_dir, cfg) as ckpt:
    missing = [k for k in layout if k not in ckpt]
    if missing:
      more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
      raise CheckpointError(f"{model_dir}: checkpoint is missing tensor {missing[0]!r}{more}")
    unexpected = [k for k in ckpt.keys() if k not in layout and not k.endswith(_IGNORED_SUFFIXES)
                  and not (k == LM_HEAD and cfg.tie_word_embeddings)]
    if unexpected:
      raise CheckpointError(
          f"{model_dir}: unexpected tensor {unexpected[0]!r} for a {cfg.architecture} model "
          f"with this config.json ({len(unexpected)} unexpected in all)")
    dtype = dtype_of(cfg.param_dtype)
    params: dict[str, Any] = {}
    names: Any = layout.items()
    if progress:
      names = tqdm.tqdm(names, desc="loading weights", unit="tensor")
    for name, (path, shape) in names:
      arr = to_ours(ckpt.read(name, hf_shape(shape, path, cfg)), path, shape).astype(dtype)
      sharding = _lookup(shardings, path) if shardings is not None else None
      node = params
      for part in path[:-1]:
        node = node.setdefault(part, {})
      node[path[-1]] = jax.device_put(arr, sharding)
  return params


def _lookup(tree: Any, path: tuple[str, ...]) -> Any:
  for part in path:
    tree = tree[part]
  return tree


def iter_hf_tensors(params: dict[str, Any], cfg: ModelConfig,
                    dtype: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, numpy tensor) pairs of our parameters, one at a time."""
  np_dtype = np.dtype(dtype_of(dtype or cfg.param_dtype))
  for name, (path, _) in hf_layout(cfg).items():
    arr = np.asarray(jax.device_get(_lookup(params, path)))
    yield name, to_hf(arr, path, cfg).astype(np_dtype)


def save_pretrained(out_dir: os.PathLike, params: dict[str, Any], cfg: ModelConfig,
                    tokenizer_dir: os.PathLike | None = None, dtype: str | None = None,
                    max_shard_bytes: int = 4 * 2**30, extra_tensors: Iterator | None = None,
                    extra_config: dict[str, Any] | None = None) -> pathlib.Path:
  """Writes a Hugging Face model directory (config, safetensors, tokenizer)."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  dtype = dtype or cfg.param_dtype
  hf_cfg = cfg.replace(param_dtype=dtype).to_hf_dict()
  hf_cfg.update(extra_config or {})
  (out / CONFIG_FILE).write_text(json.dumps(hf_cfg, indent=2) + "\n")
  gen = {"bos_token_id": cfg.bos_token_id,
         "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else cfg.eos_token_ids[0],
         "pad_token_id": cfg.pad_token_id}
  (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
  tensors = iter_hf_tensors(params, cfg, dtype)
  if extra_tensors is not None:
    tensors = _chain(tensors, extra_tensors)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, arr in tensors:
    if size and size + arr.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = arr
    size += arr.nbytes
  for stale in [out / SINGLE_FILE, out / INDEX_FILE, *out.glob("model-*-of-*.safetensors")]:
    stale.unlink(missing_ok=True)
  if len(shards) == 1:
    write_safetensors(out / SINGLE_FILE, shards[0])
  else:
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
      fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      write_safetensors(out / fname, shard)
      weight_map.update({k: fname for k in shard})
      total += sum(a.nbytes for a in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
  if tokenizer_dir is not None:
    copy_tokenizer(tokenizer_dir, out)
  return out


def _chain(*iterators):
  for it in iterators:
    yield from it


def copy_tokenizer(src: os.PathLike, dst: os.PathLike) -> None:
  src, dst = pathlib.Path(src), pathlib.Path(dst)
  copied = [f for f in TOKENIZER_FILES if (src / f).is_file()]
  if not copied:
    raise CheckpointError(f"{src}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
  if src.resolve() != dst.resolve():
    for f in copied:
      shutil.copyfile(src / f, dst / f)


def load_tokenizer(model_dir: os.PathLike):
  """The `transformers.AutoTokenizer` stored in a model directory."""
  model_dir = pathlib.Path(model_dir)
  if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
    raise CheckpointError(f"{model_dir}: no tokenizer.json or tokenizer.model in the model directory")
  # A MoME export's config.json names its own modeling code; the tokenizer needs none of it, and
  # without this transformers would ask on stdin whether to run that code.
  return transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)


def load_pretrained(name_or_path: str | os.PathLike, param_dtype: str = "float32",
                    compute_dtype: str = "float32", shardings: Any = None,
                    progress: bool = False) -> tuple[ModelConfig, dict[str, Any], pathlib.Path]:
  """(config, params, local directory) of a Hugging Face Llama/Mistral model."""
  model_dir = resolve_model_dir(name_or_path)
  cfg = load_config(model_dir, param_dtype=param_dtype, compute_dtype=compute_dtype)
  return cfg, load_params(model_dir, cfg, shardings=shardings, progress=progress), model_dir
