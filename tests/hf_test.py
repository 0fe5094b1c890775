"""Hugging Face import/export: round trips through torch `transformers`, and errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
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


def _rewrite(model_copy, edit):
  st = hf.SafetensorsFile(model_copy / hf.SINGLE_FILE)
  tensors = {k: np.array(st.get(k)) for k in st.keys()}
  edit(tensors)
  hf.write_safetensors(model_copy / hf.SINGLE_FILE, tensors)


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
  with pytest.raises(hf.CheckpointError, match="truncated"):
    hf.load_pretrained(model_copy)


def test_no_weights_file(model_copy):
  (model_copy / hf.SINGLE_FILE).unlink()
  with pytest.raises(hf.CheckpointError, match="no model.safetensors"):
    hf.load_pretrained(model_copy)
