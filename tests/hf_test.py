"""Hugging Face import/export: round trips through torch `transformers`, and errors."""

import json
import re
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
import transformers

from lamini_jax import hf
from lamini_jax import model as model_lib


def _logits(cfg, params, tokens):
  return np.asarray(model_lib.Transformer(cfg).apply({"params": params}, jnp.asarray(tokens))[0])


def test_export_loads_in_transformers_and_round_trips_bit_for_bit(stories, stories_dir, tmp_path):
  cfg, params = stories
  # Perturb the weights so the export cannot pass by copying the original file.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  params = jax.tree.unflatten(
      treedef, [x + 0.01 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  out = hf.save_pretrained(tmp_path / "export", params, cfg, tokenizer_dir=stories_dir)
  assert (out / "tokenizer.model").is_file() and (out / "generation_config.json").is_file()
  tm = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
  tokens = np.random.default_rng(0).integers(3, 512, (2, 17))
  with torch.no_grad():
    ref = tm(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(_logits(cfg, params, tokens), ref, atol=1e-4, rtol=0)
  cfg2, params2, _ = hf.load_pretrained(out)
  assert cfg2 == cfg
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)
  assert transformers.AutoTokenizer.from_pretrained(out)("Once upon").input_ids[:2] == [1, 403]


def test_sharded_bfloat16_export_with_index(stories, tmp_path):
  cfg, params = stories
  out = hf.save_pretrained(tmp_path, params, cfg, dtype="bfloat16", max_shard_bytes=60_000)
  index = json.loads((out / hf.INDEX_FILE).read_text())
  files = set(index["weight_map"].values())
  assert len(files) > 2 and not (out / hf.SINGLE_FILE).exists()
  cfg2, params2, _ = hf.load_pretrained(out, param_dtype="bfloat16")
  expected = jax.tree.map(lambda x: np.asarray(x.astype(jnp.bfloat16)), params)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), expected, params2)
  tm = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  tokens = np.random.default_rng(1).integers(3, 512, (1, 11))
  with torch.no_grad():
    ref = tm(torch.tensor(tokens)).logits.numpy()
  bf16_as_f32 = jax.tree.map(lambda x: x.astype(jnp.float32), params2)
  np.testing.assert_allclose(_logits(cfg2.replace(param_dtype="float32"), bf16_as_f32, tokens), ref,
                             atol=1e-4, rtol=0)


def test_load_straight_onto_a_mesh_sharding(stories_dir):
  cfg = hf.load_config(stories_dir)
  mesh = jax.make_mesh((8,), ("data",))
  specs = model_lib.logical_axes(model_lib.Transformer(cfg))["params"]
  rules = {"vocab": "data"}  # shard the vocabulary rows of the embedding over 8 devices
  shardings = jax.tree.map(
      lambda spec: jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec(*(rules.get(a) for a in spec))),
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  params = hf.load_params(stories_dir, cfg, shardings=shardings)
  emb = params["embedding"]
  assert emb.sharding.spec == jax.sharding.PartitionSpec("data", None)
  assert {s.data.shape for s in emb.addressable_shards} == {(64, 64)}


@pytest.fixture
def model_copy(stories_dir, tmp_path):
  dst = tmp_path / "m"
  shutil.copytree(stories_dir, dst)
  return dst


def test_missing_directory_and_config(tmp_path):
  with pytest.raises(hf.CheckpointError, match="does not exist"):
    hf.load_pretrained(tmp_path / "nowhere")
  with pytest.raises(hf.CheckpointError, match="config.json not found"):
    hf.load_pretrained(tmp_path)


def test_hub_id_offline_gives_a_clear_error(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(hf.CheckpointError, match="could not be fetched from the Hugging Face hub"):
    hf.resolve_model_dir("no-such-org/no-such-model-xyz")


def test_unsupported_architecture_names_the_supported_ones(model_copy):
  cfg = json.loads((model_copy / "config.json").read_text())
  cfg["model_type"] = "gpt2"
  (model_copy / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(hf.CheckpointError, match="'gpt2' is not supported.*llama, mistral"):
    hf.load_pretrained(model_copy)


def _rewrite(model_copy, edit, metadata=None):
  tensors = hf.read_safetensors(model_copy / hf.SINGLE_FILE)
  edit(tensors)
  hf.write_safetensors(model_copy / hf.SINGLE_FILE, tensors, metadata)


def test_wrong_shape_names_the_tensor(model_copy):
  _rewrite(model_copy, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros((171, 64), np.float32)}))
  with pytest.raises(hf.CheckpointError, match=r"'model.layers.2.mlp.up_proj.weight' has shape \[171, 64\], expected \[172, 64\]"):
    hf.load_pretrained(model_copy)


def test_missing_tensor_names_the_key(model_copy):
  _rewrite(model_copy, lambda t: t.pop("model.layers.4.self_attn.k_proj.weight"))
  with pytest.raises(hf.CheckpointError, match="missing tensor 'model.layers.4.self_attn.k_proj.weight'"):
    hf.load_pretrained(model_copy)


def test_truncated_safetensors(model_copy):
  path = model_copy / hf.SINGLE_FILE
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(hf.CheckpointError, match=re.escape(f"{path}: ") + ".*truncated"):
    hf.load_pretrained(model_copy)


def test_corrupt_header_names_the_file(model_copy):
  path = model_copy / hf.SINGLE_FILE
  path.write_bytes((16).to_bytes(8, "little") + b"this is not json")
  with pytest.raises(hf.CheckpointError, match=re.escape(f"{path}: not a readable safetensors file")):
    hf.load_pretrained(model_copy)


def test_truncated_shard_of_an_index_names_the_shard(stories, tmp_path):
  cfg, params = stories
  out = hf.save_pretrained(tmp_path, params, cfg, max_shard_bytes=60_000)
  shard = out / sorted(set(json.loads((out / hf.INDEX_FILE).read_text())["weight_map"].values()))[1]
  shard.write_bytes(shard.read_bytes()[:-4])
  with pytest.raises(hf.CheckpointError, match=re.escape(f"{shard}: ") + ".*truncated"):
    hf.load_pretrained(out)


def test_no_weights_file(model_copy):
  (model_copy / hf.SINGLE_FILE).unlink()
  with pytest.raises(hf.CheckpointError, match="no model.safetensors"):
    hf.load_pretrained(model_copy)


# ---------------------------------------------------------------------------
# Tied embeddings stored under either name.


@pytest.mark.parametrize("alias", [True, False], ids=["metadata_alias", "lm_head_only"])
def test_tied_embedding_stored_only_as_lm_head(stories, model_copy, alias):
  # What safetensors' shared-tensor de-duplication writes when it keeps `lm_head.weight`:
  # the removed name maps to the kept one in `__metadata__`. transformers also accepts the
  # copy without the alias (it ties a missing source to a present target).
  metadata = {"format": "pt", **({hf.EMBED: hf.LM_HEAD} if alias else {})}
  _rewrite(model_copy, lambda t: t.update({hf.LM_HEAD: t.pop(hf.EMBED)}), metadata)
  with safetensors.safe_open(model_copy / hf.SINGLE_FILE, framework="numpy") as f:
    assert hf.EMBED not in f.keys() and f.metadata() == metadata
  tm, info = transformers.AutoModelForCausalLM.from_pretrained(
      model_copy, local_files_only=True, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  cfg, params = stories
  np.testing.assert_array_equal(tm.model.embed_tokens.weight.detach().numpy(), params["embedding"])
  cfg2, params2, _ = hf.load_pretrained(model_copy)
  assert cfg2 == cfg
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)
  tokens = np.random.default_rng(2).integers(3, 512, (2, 13))
  with torch.no_grad():
    ref = tm.eval()(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(_logits(cfg2, params2, tokens), ref, atol=1e-4, rtol=0)


def test_tied_embedding_missing_under_both_names(model_copy):
  _rewrite(model_copy, lambda t: t.pop(hf.EMBED))
  with pytest.raises(hf.CheckpointError, match="missing tensor 'model.embed_tokens.weight'"):
    hf.load_pretrained(model_copy)


def test_bfloat16_file_reads_bit_exact_in_torch_and_back(tmp_path):
  bits_KxN = np.random.default_rng(3).integers(0, 2**16, (7, 5), dtype=np.uint16)
  bits_KxN[(bits_KxN & 0x7F80) == 0x7F80] = 0  # no NaN or inf, whose payloads may not compare
  x_KxN = bits_KxN.view(ml_dtypes.bfloat16)
  path = tmp_path / "x.safetensors"
  hf.write_safetensors(path, {"x": x_KxN.T})  # a transposed, non-contiguous view
  in_torch = safetensors.torch.load_file(path)["x"]
  assert in_torch.dtype == torch.bfloat16
  np.testing.assert_array_equal(in_torch.view(torch.int16).numpy().view(np.uint16), bits_KxN.T)
  back = hf.read_safetensors(path)["x"]
  assert back.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(back.view(np.uint16), bits_KxN.T)
