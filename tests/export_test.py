"""Exports to Hugging Face (merged, PEFT, MoME): logits and greedy answers in torch, round trips, errors.

One LoRA run (written to a run directory, exported through the CLI) and one MoME
model are memory-tuned per module on five random facts until recall is 100%.
Generation in transformers is greedy and compared with lamini-jax's token for
token up to the first newline, the template's `answer_end` (stories260K never
learned to emit </s>).
"""

import dataclasses
import json
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from lamini_jax.data import batches as batch_lib
from lamini_jax.data import encoding
from lamini_jax.data import facts as facts_lib
from lamini_jax.data import sources
from lamini_jax import evaluate as eval_lib
from lamini_jax import export
from lamini_jax import generate as gen
from lamini_jax import hf
from lamini_jax.hf_mome import configuration_lamini_mome as remote_config
from lamini_jax.hf_mome import modeling_lamini_mome
from lamini_jax.lora import LoraConfig
from lamini_jax import lora_tuning
from lamini_jax import model as model_lib
from lamini_jax.mome import config as mome_config
from lamini_jax.mome import hf_tensors
from lamini_jax.mome import layer as layer_lib
from lamini_jax.mome import router as router_lib
from lamini_jax.mome import sparse_table
from lamini_jax.mome import table as table_lib
from lamini_jax.mome import tuning as mome_tuning
from lamini_jax import runs
from lamini_jax import train as train_lib
from lamini_jax import yaml_config
from lamini_jax_kernels.gather_apply import gather_apply_reference

TEMPLATE = encoding.PromptTemplate(train_eos=False)  # stories260K never learned </s>
LORA = LoraConfig(rank=4, alpha=8.0)  # every projection; scale 2
OPTIMIZER = train_lib.OptimizerConfig(learning_rate=1e-2, multiply_by_parameter_scale=False)
TRAIN = train_lib.TrainConfig(epochs=150, batch_size=8, seq_len=64, seed=3, length_bucket=None,
                              checkpoint_every=1000, optimizer=OPTIMIZER)
MOME = mome_config.MomeTuningConfig(  # 77 = 7 x 11 experts, 3 heads x 5 = 15 slots, rank 3
    layers=(2, 4), layer=mome_config.MomeConfig(num_experts=77, expert_rank=3, num_heads=3, key_dim=10,
                                                top_k=5), balance=True,
    balance_rounds=20, generalization=mome_config.GeneralizationConfig(epochs=0), train=TRAIN)
LABEL = "lora-random"
MOME_LABEL = "mome-random"
NEWLINE = 13  # "<0x0A>", the answer_end token of the stories260K tokenizer


@pytest.fixture(scope="module")
def facts():
  short = [i for i in sources.load_truthfulqa() if len(i.question) < 40]
  items, _ = facts_lib.split_items(short, 5, 0, seed=11)
  return [facts_lib.Fact(it.question, facts_lib.random_answer(11, k)[:10], f"fact-{k}")
          for k, it in enumerate(items)]


@pytest.fixture(scope="module")
def encoded(facts, stories_tokenizer):
  return encoding.encode_facts(stories_tokenizer, TEMPLATE, facts, TRAIN.seq_len)


def _recall_hook(model, variables_of, tokenizer, facts):
  return eval_lib.recall_callback(model, variables_of, tokenizer, facts, TEMPLATE, every=5, stop_at_full=True)


@pytest.fixture(scope="module")
def lora_run(stories, stories_dir, stories_tokenizer, facts, encoded, tmp_path_factory):
  """(run_dir, model, variables, steps) of a LoRA run written like experiments.randomization's."""
  cfg, params = stories
  run_dir = tmp_path_factory.mktemp("run")
  run_cfg = runs.RunConfig(model=runs.ModelSpec(path=str(stories_dir)), lora=LORA, train=TRAIN,
                           run_dir=str(run_dir))
  (run_dir / runs.CONFIG_FILE).write_text(yaml_config.dump(run_cfg))
  hook = _recall_hook(lora_tuning.lora_model(cfg, LORA), lambda s: {"params": params, "lora": s.trainable},
                      stories_tokenizer, facts)
  model, variables, result = lora_tuning.tune_lora(cfg, params, encoded, LORA, TRAIN, pad_id=0,
                                                   paths=runs.RunDir(run_dir).paths(LABEL), label=LABEL,
                                                   progress=False, on_epoch=hook)
  assert result.history[-1]["recall"] == 1.0
  return run_dir, model, variables, int(result.state.step)


@pytest.fixture(scope="module")
def mome_run(stories, stories_tokenizer, facts, encoded, tmp_path_factory):
  """(run_dir, model, variables, steps) of a MoME run (router in mome/<label>, table checkpoints)."""
  cfg, params = stories
  run_dir = tmp_path_factory.mktemp("mome_run")
  paths = runs.RunDir(run_dir).paths(MOME_LABEL)
  prepared = mome_tuning.prepare(cfg, params, encoded, MOME, pad_id=0, paths=paths, label=MOME_LABEL,
                                 progress=False)
  hook = _recall_hook(prepared.model, prepared.variables_of, stories_tokenizer, facts)
  model, variables, result = mome_tuning.tune_mome(
      cfg, params, encoded, MOME, MOME.train, pad_id=0, paths=paths, label=MOME_LABEL,
      progress=False, on_epoch=hook, prepared=prepared)
  assert result.history[-1]["recall"] == 1.0
  return run_dir, model, variables, int(result.state.step)


def _fact_tokens(encoded):
  tokens, _ = batch_lib.stack_encoded(encoded, max(len(e.tokens) for e in encoded), 0)
  return tokens


def _check_logits(tm, model, variables, tokens):
  with torch.no_grad():
    got = tm(torch.tensor(tokens)).logits.numpy()
  want = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(tokens))[0])
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def _up_to_newline(ids):
  ids = list(ids)
  return ids[:ids.index(NEWLINE) + 1] if NEWLINE in ids else ids


def _check_greedy_answers(tm, model, variables, tokenizer, facts):
  """transformers' greedy answer is the trained one, and equals lamini-jax's up to the newline.

  Both decode all questions in one left-padded batch.
  """
  prompts = [encoding.encode_prompt(tokenizer, TEMPLATE, f.question).tolist() for f in facts]
  # The answer length + 3, as in evaluate.recall: the recall hook's compiled decoder is reused.
  n = max(len(tokenizer(f.answer, add_special_tokens=False).input_ids) for f in facts) + 3
  ours = gen.generate(model, variables, prompts, gen.SamplingConfig(max_new_tokens=n), 0)
  width = max(len(p) for p in prompts)
  ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
  with torch.no_grad():
    out = tm.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
  for fact, new, our_new in zip(facts, out[:, width:].tolist(), ours):
    text = tokenizer.decode(new, skip_special_tokens=True)
    assert TEMPLATE.answer_end in text, (fact.answer, text)
    assert text.split(TEMPLATE.answer_end, 1)[0].strip() == fact.answer
    assert _up_to_newline(new) == _up_to_newline(our_new)


def _record(out):
  return json.loads((out / export.EXPORT_FILE).read_text())


# ---------------------------------------------------------------------------
# The torch MoME layer against lamini_jax.mome.


def _torch_mome(spec, d):
  config = types.SimpleNamespace(hidden_size=d, num_hidden_layers=1, mome=spec)
  return modeling_lamini_mome.LaminiMome(config, spec["layers"][0])


def test_torch_router_matches_route_with_ties_and_bias():
  # Integer-valued router weights and inputs: scores are exact, so ties are real and
  # must be broken as lamini_jax does (lower sub-key, then lower expert index).
  cfg = mome_config.MomeConfig(num_experts=35, embed_dim=7, expert_rank=2, num_heads=3, key_dim=4, top_k=6,
                               activation="gelu", sub_keys=(5, 7), threshold=0.7)
  rng = np.random.default_rng(0)
  router = {k: rng.integers(-1, 2, s).astype(np.float32) for k, s in router_lib.router_shapes(cfg).items()}
  balance = {"bias1": rng.integers(-1, 2, (3, 5)).astype(np.float32),
             "bias2": rng.integers(-1, 2, (3, 7)).astype(np.float32)}
  table = {"down": rng.normal(size=(35, 7, 2)).astype(np.float32),
           "up": rng.normal(size=(35, 2, 7)).astype(np.float32)}
  x_TxD = rng.integers(-2, 3, (13, 7)).astype(np.float32)
  idx, w = router_lib.route(jax.tree.map(jnp.asarray, router), jnp.asarray(x_TxD), cfg,
                            jax.tree.map(jnp.asarray, balance))
  layer = _torch_mome({"layers": [0], "num_experts": 35, "sub_keys": [5, 7], "expert_rank": 2,
                       "num_heads": 3, "key_dim": 4, "top_k": 6, "activation": "gelu",
                       "threshold": 0.7}, 7)
  layer.load_state_dict({k: torch.tensor(v) for k, v in {**router, **balance, **table}.items()})
  with torch.no_grad():
    t_idx, t_w = layer.route(torch.tensor(x_TxD))
    t_y = layer(torch.tensor(x_TxD))
  s1, s2 = router_lib.half_scores(router, jnp.asarray(x_TxD))
  assert len(np.unique(np.asarray(s1 + balance["bias1"][:, None]))) < s1.size // 4  # many ties
  np.testing.assert_array_equal(t_idx.numpy(), np.asarray(idx))
  np.testing.assert_allclose(t_w.numpy(), np.asarray(w), atol=1e-6, rtol=0)
  y = gather_apply_reference(jnp.asarray(x_TxD), idx, w, table["down"], table["up"], cfg.act)
  np.testing.assert_allclose(t_y.numpy(), np.asarray(y), atol=1e-5, rtol=0)
  # unit_input: both sides' down projections see x / |x| (float64 reference).
  unit = _torch_mome({"layers": [0], "num_experts": 35, "sub_keys": [5, 7], "expert_rank": 2,
                      "num_heads": 3, "key_dim": 4, "top_k": 6, "activation": "gelu",
                      "threshold": 0.7, "unit_input": True}, 7)
  unit.load_state_dict({k: torch.tensor(v) for k, v in {**router, **balance, **table}.items()})
  with torch.no_grad():
    t_unit = unit(torch.tensor(x_TxD)).numpy()
  x64_TxD = x_TxD.astype(np.float64) / np.linalg.norm(x_TxD.astype(np.float64), axis=1, keepdims=True)
  z_TxKxR = np.einsum("TD,TKDR->TKR", x64_TxD, table["down"].astype(np.float64)[np.asarray(idx)]) - 0.7
  h_TxKxR = np.asarray(jax.nn.gelu(jnp.asarray(z_TxKxR, jnp.float32)), np.float64)
  want_TxD = np.einsum("TK,TKR,TKRD->TD", np.asarray(w, np.float64), h_TxKxR,
                       table["up"].astype(np.float64)[np.asarray(idx)])
  np.testing.assert_allclose(t_unit, want_TxD, atol=1e-5, rtol=0)
  unit_cfg = dataclasses.replace(cfg, unit_input=True)
  y_unit = table_lib.apply_experts(jnp.asarray(x_TxD), idx, w, jax.tree.map(jnp.asarray, table), unit_cfg,
                                   gather_apply_reference)
  np.testing.assert_allclose(np.asarray(y_unit), want_TxD, atol=1e-5, rtol=0)
  assert np.abs(want_TxD - np.asarray(y, np.float64)).max() > 0.1  # normalizing changes the output


def test_torch_sparse_table_gives_the_whole_tables_outputs():
  # Half the experts untrained (up = 0): the sparse layer holds the other half and their ids.
  spec = {"layers": [0], "num_experts": 35, "sub_keys": [5, 7], "expert_rank": 2, "num_heads": 3,
          "key_dim": 4, "top_k": 6, "activation": "silu", "threshold": 0.3}
  cfg = mome_config.MomeConfig(num_experts=35, embed_dim=7, expert_rank=2, num_heads=3, key_dim=4,
                               top_k=6, activation="silu", sub_keys=(5, 7), threshold=0.3)
  rng = np.random.default_rng(3)
  router = {k: rng.normal(size=s).astype(np.float32) for k, s in router_lib.router_shapes(cfg).items()}
  balance = {"bias1": np.zeros((3, 5), np.float32), "bias2": np.zeros((3, 7), np.float32)}
  up = rng.normal(size=(35, 2, 7)).astype(np.float32)
  up[rng.permutation(35)[:18]] = 0
  table = {"down": rng.normal(size=(35, 7, 2)).astype(np.float32), "up": up}
  stored = sparse_table.sparse(jax.tree.map(jnp.asarray, table))
  np.testing.assert_array_equal(stored["rows"], np.flatnonzero(np.abs(up).sum(axis=(1, 2))))
  whole = _torch_mome(spec, 7)
  whole.load_state_dict({k: torch.tensor(v) for k, v in {**router, **balance, **table}.items()})
  part = _torch_mome({**spec, "stored_rows": [17]}, 7)
  part.load_state_dict({k: torch.tensor(v) for k, v in {**router, **balance, **stored}.items()})
  x_TxD = torch.tensor(rng.normal(size=(40, 7)).astype(np.float32))
  with torch.no_grad():
    want, got = whole(x_TxD).numpy(), part(x_TxD).numpy()
  hit = np.isin(np.asarray(whole.route(x_TxD)[0]), stored["rows"])
  assert hit.any() and not hit.all()  # tokens reach stored and unstored experts
  np.testing.assert_array_equal(got, want)
  back = sparse_table.dense(stored, {"down": (35, 7, 2), "up": (35, 2, 7)}, "test")
  np.testing.assert_array_equal(back["up"], up)
  with pytest.raises(ValueError, match="test: rows must be ascending distinct expert ids in 0..34"):
    sparse_table.dense({**stored, "rows": stored["rows"][::-1]}, {"down": (35, 7, 2), "up": (35, 2, 7)},
                       "test")
  with pytest.raises(ValueError, match=r"config.mome.stored_rows must list one row count"):
    _torch_mome({**spec, "stored_rows": [36]}, 7)


def test_torch_mome_config_errors_name_the_field():
  spec = {"layers": [3], "num_experts": 12, "sub_keys": [3, 4], "expert_rank": 1, "num_heads": 2,
          "key_dim": 4, "top_k": 2, "activation": "gelu"}
  with pytest.raises(ValueError, match=r"config.mome.layers \[3\]: layer 3 is outside 0..0"):
    _torch_mome(spec, 8)
  with pytest.raises(ValueError, match="config.mome.activation 'erf'"):
    _torch_mome({**spec, "layers": [0], "activation": "erf"}, 8)
  with pytest.raises(ValueError, match="config.mome.threshold must be a finite number >= 0, got -1"):
    _torch_mome({**spec, "layers": [0], "threshold": -1}, 8)
  with pytest.raises(ValueError, match="config.mome.unit_input must be true or false, got 'yes'"):
    _torch_mome({**spec, "layers": [0], "unit_input": "yes"}, 8)


# ---------------------------------------------------------------------------
# Merged and PEFT exports of a run directory, through the command line.


@pytest.mark.slow
def test_merged_export_loads_in_transformers_and_recalls_every_fact(
    lora_run, stories, stories_dir, stories_tokenizer, facts, encoded, tmp_path):
  run_dir, model, variables, steps = lora_run
  out = tmp_path / "merged"
  assert export.main(["--checkpoint", str(run_dir), "--adapter", LABEL, "--out", str(out),
                      "--format", "merged"]) == 0
  assert {"config.json", "generation_config.json", "model.safetensors",
          "tokenizer.model"} <= {p.name for p in out.iterdir()}
  record = _record(out)
  assert (record["format"], record["label"], record["step"]) == ("merged", LABEL, steps)
  assert record["run_dir"] == str(run_dir.resolve()) and record["base_model"] == str(stories_dir.resolve())
  tm = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
  assert type(tm).__name__ == "LlamaForCausalLM"
  _check_logits(tm, model, variables, _fact_tokens(encoded))
  _check_greedy_answers(tm, model, variables, stories_tokenizer, facts)
  # Import back: the merged weights, bit for bit.
  back, back_vars, _ = export.load_export(out)
  assert back.cfg == stories[0] and back.lora is None
  merged = model_lib.merge_lora(variables["params"], variables["lora"], LORA)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, merged),
               jax.tree.map(np.asarray, back_vars["params"]))


@pytest.mark.slow
def test_peft_adapter_loads_onto_the_base_model_and_recalls_every_fact(
    lora_run, stories_dir, stories_tokenizer, facts, encoded, tmp_path):
  peft = pytest.importorskip("peft")
  run_dir, model, variables, _ = lora_run
  out = tmp_path / "adapter"
  assert export.main(["--checkpoint", str(run_dir / "checkpoints" / LABEL), "--out", str(out),
                      "--format", "peft"]) == 0
  config = peft.PeftConfig.from_pretrained(out)
  assert config.base_model_name_or_path == str(stories_dir.resolve())
  assert (config.r, config.lora_alpha, config.use_rslora) == (4, 8.0, False)
  assert set(config.target_modules) == {f"{p}_proj" for p in LORA.targets}
  base = transformers.AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path)
  tm = peft.PeftModel.from_pretrained(base, out).eval()
  assert tm.active_peft_config.r == 4
  _check_logits(tm, model, variables, _fact_tokens(encoded))
  _check_greedy_answers(tm, model, variables, stories_tokenizer, facts)
  # Import back: the "lora" collection, bit for bit.
  back, back_vars, _ = export.load_export(out)
  assert back.lora == LORA
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, variables["lora"]),
               jax.tree.map(np.asarray, back_vars["lora"]))


def test_peft_tensor_layout_matches_the_adapter_einsums():
  # o: A [N, H, R] contracts heads; q: B [R, N, H] produces heads. PEFT's A is [R, in], B [out, R].
  cfg = model_lib.ModelConfig(vocab_size=11, hidden_size=6, intermediate_size=5, num_layers=1,
                              num_heads=3, num_kv_heads=1, head_dim=2)
  lora = LoraConfig(rank=2, alpha=6.0, targets=("q", "o", "down"))
  rng = np.random.default_rng(0)
  ab = lambda a_shape, b_shape: {"a": rng.normal(size=a_shape).astype(np.float32),
                                 "b": rng.normal(size=b_shape).astype(np.float32)}
  variables = {"lora": {"layers_0": {"attn": {"q": ab((6, 2), (2, 3, 2)), "o": ab((3, 2, 2), (2, 6))},
                                     "mlp": {"down": ab((5, 2), (2, 6))}}}}
  tensors = export.peft_tensors(variables["lora"])
  x = rng.normal(size=(3, 6)).astype(np.float64)
  heads = rng.normal(size=(3, 3, 2)).astype(np.float64)
  layer = variables["lora"]["layers_0"]
  name = "base_model.model.model.layers.0.self_attn.{}_proj.lora_{}.weight"
  q_a, q_b = (np.asarray(layer["attn"]["q"][k], np.float64) for k in "ab")
  want = np.einsum("TD,DR,RNH->TNH", x, q_a, q_b).reshape(3, 6)
  got = x @ tensors[name.format("q", "A")].T.astype(np.float64) @ tensors[name.format("q", "B")].T
  np.testing.assert_allclose(got, want, rtol=1e-6)
  o_a, o_b = (np.asarray(layer["attn"]["o"][k], np.float64) for k in "ab")
  want = np.einsum("TNH,NHR,RD->TD", heads, o_a, o_b)
  got = heads.reshape(3, 6) @ tensors[name.format("o", "A")].T @ tensors[name.format("o", "B")].T
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert len(tensors) == 6
  back = export.lora_from_peft(tensors, cfg, lora)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, variables["lora"]), back)


# ---------------------------------------------------------------------------
# MoME export with its modeling code.


@pytest.mark.slow
def test_mome_export_runs_in_transformers_with_remote_code_and_recalls_every_fact(
    mome_run, stories_dir, stories_tokenizer, facts, encoded, tmp_path):
  _, model, variables, _ = mome_run
  balance = variables[layer_lib.BALANCE]["layers_2"]["mome"]["bias1"]
  assert float(jnp.abs(balance).max()) > 0  # the selection bias is exercised
  out = export.export_mome(tmp_path / "mome", model, variables, tokenizer_dir=stories_dir,
                           source=export.Source(base_model=str(stories_dir)), max_shard_bytes=150_000)
  index = json.loads((out / hf.INDEX_FILE).read_text())
  assert len(set(index["weight_map"].values())) > 2 and not (out / hf.SINGLE_FILE).exists()
  assert "model.layers.4.mlp.mome.rows" in index["weight_map"]
  config = json.loads((out / "config.json").read_text())
  assert config["mome"]["sub_keys"] == [7, 11] and config["mome"]["layers"] == [2, 4]
  trained = [sparse_table.trained_rows(variables[layer_lib.TABLE][f"layers_{i}"]["mome"]["up"])
             for i in (2, 4)]
  assert config["mome"]["stored_rows"] == [len(r) for r in trained]  # 77 each: 5 facts use every row
  with pytest.raises(ValueError, match="trust_remote_code"):
    transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
  tm = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
  assert type(tm).__name__ == "LaminiMomeLlamaForCausalLM"
  assert type(tm.model.layers[4].mlp).__name__ == "LaminiMomeLlamaMLP"
  assert not hasattr(tm.model.layers[3].mlp, "mome")
  _check_logits(tm, model, variables, _fact_tokens(encoded))
  _check_greedy_answers(tm, model, variables, stories_tokenizer, facts)
  # Import back: the same model and every variable bit for bit, `down` on the trained rows.
  back, back_vars, _ = export.load_export(out)
  assert back.mome == model.mome and back.mome_layers == model.mome_layers
  _check_sparse_round_trip(variables, back_vars, model.mome_layers)


def _check_sparse_round_trip(variables, back, layers):
  """`back` (a sparse export read back) equals `variables`, but untrained rows' `down` are zero."""
  variables, back = jax.tree.map(np.asarray, variables), jax.tree.map(np.asarray, back)
  table, back_table = variables.pop(layer_lib.TABLE), back.pop(layer_lib.TABLE)
  jax.tree.map(np.testing.assert_array_equal, variables, back)
  for i in layers:
    want, got = table[f"layers_{i}"]["mome"], back_table[f"layers_{i}"]["mome"]
    np.testing.assert_array_equal(got["up"], want["up"])
    rows = np.abs(want["up"]).sum(axis=(1, 2)) > 0
    np.testing.assert_array_equal(got["down"][rows], want["down"][rows])
    assert not got["down"][~rows].any()


def test_mistral_mome_export_with_untied_head_and_sliding_window(tmp_path):
  cfg = model_lib.ModelConfig(vocab_size=97, hidden_size=24, intermediate_size=37, num_layers=3, num_heads=6,
                              num_kv_heads=2, head_dim=6, architecture="mistral", sliding_window=5,
                              max_position_embeddings=64)
  mome_cfg = mome_config.MomeConfig(num_experts=30, embed_dim=24, expert_rank=2, num_heads=2, key_dim=6, top_k=3,
                                    activation="silu", sub_keys=(5, 6), threshold=0.5)
  model = model_lib.Transformer(cfg, mome=mome_cfg, mome_layers=(0, 2))
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  variables = nn.meta.unbox(variables)
  keys = iter(jax.random.split(jax.random.key(1), 8))
  for i in (0, 2):  # a trained-looking table (up != 0 in 2 rows of 3) and a selection bias
    up = jax.random.normal(next(keys), (30, 2, 24)) * (jnp.arange(30) % 3 > 0)[:, None, None]
    variables[layer_lib.TABLE][f"layers_{i}"]["mome"]["up"] = up
    variables[layer_lib.BALANCE][f"layers_{i}"]["mome"]["bias2"] = jax.random.normal(next(keys), (2, 6))
  out = export.export_mome(tmp_path / "mistral", model, variables)
  whole = export.export_mome(tmp_path / "whole", model, variables, whole_table=True)
  config = json.loads((out / "config.json").read_text())
  assert config["model_type"] == "lamini_mome_mistral" and config["mome"]["stored_rows"] == [20, 20]
  assert "stored_rows" not in json.loads((whole / "config.json").read_text())["mome"]
  tm = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
  tm_whole = transformers.AutoModelForCausalLM.from_pretrained(whole, trust_remote_code=True).eval()
  assert type(tm).__name__ == "LaminiMomeMistralForCausalLM" and not tm.config.tie_word_embeddings
  tokens = np.random.default_rng(2).integers(0, 97, (2, 13))
  _check_logits(tm, model, variables, tokens)
  with torch.no_grad():
    np.testing.assert_array_equal(tm(torch.tensor(tokens)).logits.numpy(),
                                  tm_whole(torch.tensor(tokens)).logits.numpy())
  base = np.asarray(jax.jit(model_lib.Transformer(cfg).apply)({"params": variables["params"]},
                                                              jnp.asarray(tokens))[0])
  with torch.no_grad():
    assert np.abs(tm(torch.tensor(tokens)).logits.numpy() - base).max() > 0.1  # the MoME branch matters
  back, back_vars, _ = export.load_export(out)
  same_grid = lambda m: dataclasses.replace(m, sub_keys=m.grid)  # (5, 6) is also the default split
  assert (back.cfg, back.mome_layers, same_grid(back.mome)) == (cfg, (0, 2), same_grid(mome_cfg))
  _check_sparse_round_trip(variables, back_vars, (0, 2))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, variables),
               jax.tree.map(np.asarray, export.load_export(whole)[1]))


@pytest.mark.slow
def test_mome_run_exports_through_the_command_line(mome_run, stories_dir, encoded, tmp_path):
  run_dir, model, variables, steps = mome_run
  run_cfg = runs.RunConfig(model=runs.ModelSpec(path=str(stories_dir)), method="mome", mome=MOME,
                           run_dir=str(run_dir))
  (run_dir / runs.CONFIG_FILE).write_text(yaml_config.dump(run_cfg))
  out = tmp_path / "mome"
  assert export.main(["--checkpoint", str(run_dir), "--adapter", MOME_LABEL, "--out", str(out),
                      "--format", "mome"]) == 0
  record = _record(out)
  assert (record["format"], record["label"], record["step"]) == ("mome", MOME_LABEL, steps)
  tm = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
  _check_logits(tm, model, variables, _fact_tokens(encoded))


# ---------------------------------------------------------------------------
# Errors.


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
  assert export.main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"),
                      "--format", "merged"]) == 2
  assert "does not exist" in capsys.readouterr().err
  with pytest.raises(export.ExportError, match="nowhere does not exist"):
    export.export_checkpoint(tmp_path / "nowhere", tmp_path / "o", "merged")
  with pytest.raises(export.ExportError, match="neither a run directory"):
    export.export_checkpoint(tmp_path, tmp_path / "o", "merged")


@pytest.fixture
def fake_runs(tmp_path, stories_dir):
  """A run directory holding one LoRA label and one MoME label (no weights needed for these errors)."""
  run_dir = tmp_path / "run"
  (run_dir / "checkpoints" / "lora-real").mkdir(parents=True)
  (run_dir / "checkpoints" / "mome-random").mkdir(parents=True)
  (run_dir / "mome" / "mome-random" / "router").mkdir(parents=True)
  (run_dir / "mome" / "mome-random" / "collisions.json").write_text("{}\n")
  (run_dir / runs.CONFIG_FILE).write_text(yaml_config.dump(runs.RunConfig(model=runs.ModelSpec(str(stories_dir)))))
  return run_dir


def test_format_that_does_not_fit_the_run_is_a_clear_error(fake_runs, tmp_path, capsys):
  out = tmp_path / "o"
  assert export.main(["--checkpoint", str(fake_runs), "--adapter", "mome-random", "--out", str(out),
                      "--format", "peft"]) == 2
  err = capsys.readouterr().err
  assert "'mome-random' is a MoME run" in err and "PEFT" in err and "--format mome" in err
  with pytest.raises(export.ExportError, match="MoME run.*cannot be folded into the weights"):
    export.export_checkpoint(fake_runs / "checkpoints" / "mome-random", out, "merged")
  with pytest.raises(export.ExportError, match="holds LoRA adapters, not a MoME model"):
    export.export_checkpoint(fake_runs, out, "mome", adapter="lora-real")
  with pytest.raises(export.ExportError, match=r"holds 2 trained models \['lora-real', 'mome-random'\]"):
    export.export_checkpoint(fake_runs, out, "merged")
  with pytest.raises(export.ExportError, match=r"no checkpoint for label 'lora-x'; available"):
    export.export_checkpoint(fake_runs, out, "merged", adapter="lora-x")
  assert not out.exists()


def test_out_dir_is_never_silently_overwritten(tmp_path, stories):
  cfg, params = stories
  out = tmp_path / "o"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  lora_vars = {}  # never read: the output directory is checked first
  with pytest.raises(export.ExportError, match="is not empty"):
    export.export_merged(out, cfg, params, lora_vars, LORA)
  with pytest.raises(export.ExportError, match="not a lamini-jax export"):
    export.export_merged(out, cfg, params, lora_vars, LORA, overwrite=True)
  assert (out / "notes.txt").read_text() == "mine"


def test_mome_export_fields_are_the_layer_config_s():
  # The `mome` field of a MoME export is MomeConfig's field list (its width excepted), and the
  # remote code shipped with the export reads exactly those.
  layer_fields = {f.name for f in dataclasses.fields(mome_config.MomeConfig)} - {"embed_dim"}
  assert set(hf_tensors.MOME_HF_FIELDS) == layer_fields
  read_by_remote = set(remote_config._INT_FIELDS) | {"activation", "sub_keys", "threshold", "unit_input"}
  assert read_by_remote == layer_fields
  cfg = mome_config.MomeConfig(num_experts=35, embed_dim=7, expert_rank=2, num_heads=3, key_dim=4,
                               top_k=6, activation="relu", sub_keys=(5, 7), threshold=0.5)
  backbone = model_lib.ModelConfig(vocab_size=11, hidden_size=7, intermediate_size=5, num_layers=2,
                                   num_heads=1, num_kv_heads=1, head_dim=7, max_position_embeddings=16)
  spec = hf_tensors.mome_hf_config(model_lib.Transformer(backbone, mome=cfg, mome_layers=(1,)))
  got = hf_tensors.mome_config_of(spec, 7)  # sub_keys None: (5, 7) is 35's default split
  assert got.grid == cfg.grid and dataclasses.replace(got, sub_keys=cfg.sub_keys) == cfg
