"""Hugging Face checkpoints: import and export of Llama / Mistral directories.

Import streams tensor by tensor from `model.safetensors` or a sharded
`model.safetensors.index.json`: each tensor is read from a memory map, laid out
for our modules, cast and placed on its device (or mesh sharding) before the
next is read, so host memory never holds a second copy of the model. Export
writes a directory that `transformers.AutoModelForCausalLM.from_pretrained`
loads offline.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import struct
from typing import Any, Iterator

import jax
import ml_dtypes
import numpy as np

from lamini_jax.config import ModelConfig, dtype_of
from lamini_jax.model import PROJECTIONS, module_of

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_ST_TO_NP = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_NP_TO_ST = {np.dtype(v): k for k, v in _ST_TO_NP.items()}


class CheckpointError(ValueError):
  """A checkpoint directory or file that cannot be used, with the reason."""


# ---------------------------------------------------------------------------
# safetensors: 8-byte little-endian header size, a JSON header, then raw data.


class SafetensorsFile:
  """A lazily read safetensors file; `get` memory-maps one tensor at a time."""

  def __init__(self, path: os.PathLike):
    self.path = pathlib.Path(path)
    size = self.path.stat().st_size
    with open(self.path, "rb") as f:
      raw = f.read(8)
      if len(raw) < 8:
        raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
      (n,) = struct.unpack("<Q", raw)
      if n > size - 8:
        raise CheckpointError(
            f"{self.path}: truncated or not a safetensors file (header of {n} bytes, file of {size})")
      try:
        header = json.loads(f.read(n))
      except ValueError as e:
        raise CheckpointError(f"{self.path}: corrupt safetensors header: {e}") from None
    header.pop("__metadata__", None)
    self._offset = 8 + n
    self._header = header
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if self._offset + end > size:
      raise CheckpointError(
          f"{self.path}: truncated safetensors file: the header declares "
          f"{self._offset + end} bytes, the file has {size}")

  def keys(self) -> list[str]:
    return list(self._header)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._header[key]["shape"])

  def get(self, key: str) -> np.ndarray:
    info = self._header[key]
    if info["dtype"] not in _ST_TO_NP:
      raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    dtype = np.dtype(_ST_TO_NP[info["dtype"]])
    count = (end - start) // dtype.itemsize
    arr = np.memmap(self.path, dtype=dtype, mode="r", offset=self._offset + start, shape=(count,))
    return arr.reshape(info["shape"])


def write_safetensors(path: os.PathLike, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
  """Writes tensors (numpy, ml_dtypes bfloat16 included) in safetensors format."""
  header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
  offset = 0
  for name, arr in tensors.items():
    nbytes = arr.size * arr.dtype.itemsize
    header[name] = {"dtype": _NP_TO_ST[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  tmp = pathlib.Path(str(path) + ".tmp")
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for arr in tensors.values():
      f.write(np.ascontiguousarray(arr).tobytes())
  os.replace(tmp, path)


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
  import huggingface_hub  # pylint: disable=g-import-not-at-top
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
      "model.embed_tokens.weight": (("embedding",), (cfg.vocab_size, d)),
      "model.norm.weight": (("final_norm", "scale"), (d,)),
  }
  if not cfg.tie_word_embeddings:
    out["lm_head.weight"] = (("lm_head",), (d, cfg.vocab_size))
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


def _hf_shape(ours: tuple[int, ...], path: tuple[str, ...], cfg: ModelConfig) -> tuple[int, ...]:
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
  hf_shape = _hf_shape(arr.shape, path, cfg)
  if path[-1] == "kernel" or path == ("lm_head",):
    return np.ascontiguousarray(arr.reshape(hf_shape[::-1]).T)
  return arr


def _weight_files(model_dir: pathlib.Path) -> dict[str, pathlib.Path]:
  """Tensor name -> the safetensors file holding it."""
  index = model_dir / INDEX_FILE
  single = model_dir / SINGLE_FILE
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError) as e:
      raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
    files = {name: model_dir / f for name, f in weight_map.items()}
    for f in sorted(set(files.values())):
      if not f.is_file():
        raise CheckpointError(f"{index} lists {f.name}, which is missing from {model_dir}")
    return files
  if single.is_file():
    return {k: single for k in SafetensorsFile(single).keys()}
  found = sorted(p.name for p in model_dir.iterdir())
  raise CheckpointError(
      f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} (found: {', '.join(found) or 'nothing'}); "
      "lamini-jax reads safetensors checkpoints only")


def load_params(model_dir: os.PathLike, cfg: ModelConfig, shardings: Any = None,
                progress: bool = False) -> dict[str, Any]:
  """Reads the weights into our parameter tree, one tensor at a time.

  `shardings`, if given, is a tree of `jax.sharding.Sharding` matching the
  parameters; each tensor goes straight to its sharding.
  """
  model_dir = pathlib.Path(model_dir)
  files = _weight_files(model_dir)
  layout = hf_layout(cfg)
  missing = [k for k in layout if k not in files]
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise CheckpointError(f"{model_dir}: checkpoint is missing tensor {missing[0]!r}{more}")
  unexpected = [k for k in files if k not in layout and not k.endswith(_IGNORED_SUFFIXES)
                and not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
  if unexpected:
    raise CheckpointError(
        f"{model_dir}: unexpected tensor {unexpected[0]!r} for a {cfg.architecture} model "
        f"with this config.json ({len(unexpected)} unexpected in all)")
  dtype = dtype_of(cfg.param_dtype)
  opened: dict[pathlib.Path, SafetensorsFile] = {}
  params: dict[str, Any] = {}
  names: Any = layout.items()
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    names = tqdm.tqdm(names, desc="loading weights", unit="tensor")
  for name, (path, shape) in names:
    file = files[name]
    if file not in opened:
      opened[file] = SafetensorsFile(file)
    st = opened[file]
    hf_shape = _hf_shape(shape, path, cfg)
    if st.shape(name) != hf_shape:
      raise CheckpointError(
          f"{file}: tensor {name!r} has shape {list(st.shape(name))}, expected {list(hf_shape)} "
          "from config.json")
    arr = to_ours(st.get(name), path, shape).astype(dtype)
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
  import transformers  # pylint: disable=g-import-not-at-top
  model_dir = pathlib.Path(model_dir)
  if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
    raise CheckpointError(f"{model_dir}: no tokenizer.json or tokenizer.model in the model directory")
  return transformers.AutoTokenizer.from_pretrained(model_dir)


def load_pretrained(name_or_path: str | os.PathLike, param_dtype: str = "float32",
                    compute_dtype: str = "float32", shardings: Any = None,
                    progress: bool = False) -> tuple[ModelConfig, dict[str, Any], pathlib.Path]:
  """(config, params, local directory) of a Hugging Face Llama/Mistral model."""
  model_dir = resolve_model_dir(name_or_path)
  cfg = load_config(model_dir, param_dtype=param_dtype, compute_dtype=compute_dtype)
  return cfg, load_params(model_dir, cfg, shardings=shardings, progress=progress), model_dir
