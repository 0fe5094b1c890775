"""Editing a MoME run's memory: the registry, the edit step, and add / forget / update end to end."""

import dataclasses
import re
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lamini_jax.config import ModelConfig
from lamini_jax.data import batches as batch_lib
from lamini_jax.data import encoding
from lamini_jax.data import facts as facts_lib
from lamini_jax import evaluate as eval_lib
from lamini_jax import export
from lamini_jax import facts as facts_cli
from lamini_jax import hf
from lamini_jax import model as model_lib
from lamini_jax.mome import anchors as anchors_lib
from lamini_jax.mome import collisions as collisions_lib
from lamini_jax.mome import config as mome_config
from lamini_jax.mome import edit as edit_lib
from lamini_jax.mome import edit_checks
from lamini_jax.mome import inputs as inputs_lib
from lamini_jax.mome import layer as layer_lib
from lamini_jax.mome import registry
from lamini_jax.mome import steps as steps_lib
from lamini_jax.mome import table as table_lib
from lamini_jax.mome import tuning as mome_tuning
from lamini_jax import runs
from lamini_jax import tune
from lamini_jax import yaml_config

LAYER = "layers_4/mome"


# ----------------------------------------------------------------------------
# Pieces: keying some rows, the registry, the step's focus.
# ----------------------------------------------------------------------------


def test_key_rows_only_keys_the_rows_asked_for():
  cfg = mome_config.MomeConfig(num_experts=16, embed_dim=5, expert_rank=2, num_heads=1, top_k=3,
                               activation="relu", threshold=2.0)
  rng = np.random.default_rng(0)
  table = {"down": jnp.asarray(rng.normal(size=(16, 5, 2)), jnp.float32),
           "up": jnp.asarray(rng.normal(size=(16, 2, 5)), jnp.float32)}
  before = jax.tree.map(np.asarray, table)
  idx_PxK = rng.integers(0, 16, size=(7, 3))
  x_PxD = rng.normal(size=(7, 5))
  full = jax.tree.map(np.asarray, table_lib.key_rows(jax.tree.map(jnp.copy, table), idx_PxK, x_PxD, cfg, 0.8))
  only = np.unique(idx_PxK)[:3]
  some = jax.tree.map(np.asarray, table_lib.key_rows(table, idx_PxK, x_PxD, cfg, 0.8, only=only))
  np.testing.assert_array_equal(some["down"][only], full["down"][only])
  rest = np.setdiff1d(np.arange(16), only)
  np.testing.assert_array_equal(some["down"][rest], before["down"][rest])
  np.testing.assert_array_equal(some["up"], before["up"])


def test_fires_at_is_the_brute_force_over_positions_that_share_an_expert():
  rng = np.random.default_rng(0)
  for _ in range(10):
    x_PxD = rng.normal(size=(7, 5))
    x_QxD = (x_PxD[rng.integers(0, 7, 9)] * rng.uniform(0.5, 1.5, (9, 1))
             + 0.3 * rng.normal(size=(9, 5)))
    idx_PxK, idx_QxK = rng.integers(0, 12, (7, 4)), rng.integers(0, 12, (9, 4))
    want = np.array([[any(idx_PxK[p, k] in idx_QxK[q] and x_QxD[q] @ x_PxD[p] > 0.9 * x_PxD[p] @ x_PxD[p]
                          for q in range(9)) for k in range(4)] for p in range(7)])
    assert want.any() and not want.all()
    np.testing.assert_array_equal(collisions_lib.fires_at(x_PxD, idx_PxK, x_QxD, idx_QxK, 0.9), want)
  # The choice takes a free expert that would not fire first, then a free one that would.
  idx, w = np.array([[4, 6, 8]]), np.array([[.5, .3, .2]])
  avoid = np.array([[False, True, False]])
  np.testing.assert_array_equal(collisions_lib.exclusive_slots(idx, w, 1, avoid=avoid), [[1, 0, 0]])
  np.testing.assert_array_equal(collisions_lib.exclusive_slots(idx, w, 1, taken=[4], avoid=avoid),
                                [[0, 0, 1]])
  np.testing.assert_array_equal(collisions_lib.exclusive_slots(idx, w, 2, taken=[4, 8], avoid=avoid),
                                [[1, 1, 0]])  # free before taken, whether it would fire or not
  # A fragile slot (float rounding could drop it from the selection) is taken last of all.
  fragile = np.array([[True, False, False]])
  np.testing.assert_array_equal(collisions_lib.exclusive_slots(idx, w, 1, fragile=fragile), [[0, 1, 0]])
  np.testing.assert_array_equal(collisions_lib.exclusive_slots(idx, w, 1, taken=[6, 8], fragile=fragile),
                                [[0, 1, 0]])  # before a fragile free one, a taken one
  np.testing.assert_array_equal(collisions_lib.exclusive_slots(idx, w, 3, fragile=fragile), [[1, 1, 1]])


def _stored(fid, rows, reads=()):
  return registry.StoredFact(fid, f"q {fid}?", f"a {fid}", "2026-01-01T00:00:00+00:00",
                             {LAYER: tuple(rows)}, {LAYER: tuple(reads)} if reads else {})


def test_registry_commit_neighbours_and_errors(tmp_path):
  facts = [_stored("a", [1, 2, 3]), _stored("b", [3, 4]), _stored("c", [7], reads=[4]), _stored("d", [9])]
  assert [f.id for f in registry.neighbours(facts, {LAYER: np.array([4])})] == ["b", "c"]
  assert registry.neighbour_map(facts) == {"a": {"b": 1}, "b": {"a": 1, "c": 1}, "c": {"b": 1}, "d": {}}
  with pytest.raises(KeyError, match="no stored fact has id 'x'"):
    registry.find(facts, fact_id="x")
  with pytest.raises(KeyError, match="no stored fact has question 'q z\\?'"):
    registry.find(facts, question="q z?")
  assert registry.find(facts, question=" q b? ").id == "b"
  store = tmp_path / "store"
  assert registry.read_manifest(store) is None
  rows = {LAYER: {"rows": np.array([3, 4]), "up": np.ones((2, 1, 5), np.float32)}}
  registry.commit(store, 0, 8, facts[:2], {}, "first")
  (store / registry.MEMORY_DIR / "rows-000001.npz").write_bytes(b"left by a killed commit")
  manifest = registry.commit(store, 1, 8, facts, rows, "second")
  assert registry.read_manifest(store) == manifest and manifest.base_step == 8
  assert registry.load_facts(store, manifest) == facts
  loaded = registry.load_rows(store, manifest)
  np.testing.assert_array_equal(loaded[LAYER]["up"], rows[LAYER]["up"])
  # The current and the previous version's files are kept, the rest removed.
  assert sorted(p.name for p in (store / registry.MEMORY_DIR).iterdir()) == [
      "facts-000000.jsonl", "facts-000001.jsonl", "rows-000001.npz"]
  registry.commit(store, 2, 8, facts, {}, "third")
  assert sorted(p.name for p in (store / registry.MEMORY_DIR).iterdir()) == [
      "facts-000001.jsonl", "facts-000002.jsonl", "rows-000001.npz"]
  assert registry.load_rows(store, registry.read_manifest(store)) == {}
  with registry.locked(store):
    with pytest.raises(RuntimeError, match="another process is editing"):
      with registry.locked(store):
        pass


def test_a_bad_batch_of_edits_is_an_error_that_names_the_fact():
  facts = [_stored("a", [1, 2]), _stored("b", [2, 3]), _stored("c", [5])]
  a, b, c = facts
  edit_checks.check_edits(facts, [a, c], [(b, "new b")])  # a good batch
  for forget, update, error, message in (
      ([_stored("x", [1])], [], KeyError, "fact 'x' is not stored"),
      ([a, b, a], [], ValueError, "fact 'a' is named twice among the facts to forget"),
      ([], [(b, "one"), (b, "two")], ValueError, "fact 'b' is named twice among the facts to update"),
      ([a], [(c, "new c"), (a, "new a")], ValueError, "fact 'a' is both forgotten and updated"),
      ([], [(a, "new a"), (b, " a b ")], ValueError, "fact 'b' already has the answer 'a b'"),
      ([], [(c, "  ")], ValueError, "the new answer of fact 'c' is empty")):
    with pytest.raises(error, match=message):
      edit_checks.check_edits(facts, forget, update)
  for edit, batch in ((edit_lib.forget, []), (edit_lib.update, [])):
    with pytest.raises(ValueError, match="no facts to"):
      edit(None, None, facts, batch, epochs=1)


def test_a_file_of_new_answers_names_facts_by_id_or_question(tmp_path):
  facts = [_stored("a", [1]), _stored("b", [2])]
  jsonl = tmp_path / "new.jsonl"
  jsonl.write_text('{"id": "a", "answer": " A2 "}\n\n{"question": "q b?", "answer": "B2"}\n')
  changes = edit_checks.load_changes(jsonl)
  assert [(c.find(facts).id, c.answer) for c in changes] == [("a", "A2"), ("b", "B2")]
  csv = tmp_path / "new.csv"
  csv.write_text("fact_id,question,answer\na,,A3\n,q b?,B3\n")
  assert [(c.find(facts).id, c.answer) for c in edit_checks.load_changes(csv)] == [("a", "A3"), ("b", "B3")]
  for name, text, message in (
      ("no-answer.jsonl", '{"id": "a"}\n', "no-answer.jsonl: line 1: 'answer' must be a non-empty"),
      ("no-name.jsonl", '{"answer": "x"}\n', "no-name.jsonl: line 1: name the stored fact by 'id' or"),
      ("bad.jsonl", '{"id": "a", "answer": "x"}\n{"id"\n', "bad.jsonl: line 2: invalid JSON"),
      ("header.csv", "name,answer\nb,x\n", "header.csv: row 1 must be a header with 'answer' and 'id'"),
      ("short.csv", "id,answer\na\n", "short.csv: row 2: expected 2 columns"),
      ("empty.jsonl", "\n", "empty.jsonl: no facts"), ("new.txt", "", "must end in .jsonl")):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
      edit_checks.load_changes(tmp_path / name)
  with pytest.raises(KeyError, match=r"line 1: no stored fact has id 'z'"):
    edit_checks.load_changes(_jsonl(tmp_path / "z.jsonl", [{"id": "z", "answer": "x"}]))[0].find(facts)
  wrong = _jsonl(tmp_path / "w.jsonl", [{"id": "a", "question": "q b?", "answer": "x"}])
  with pytest.raises(ValueError, match=r"line 1: fact 'a' has the question 'q a\?', not 'q b\?'"):
    edit_checks.load_changes(wrong)[0].find(facts)


def _tiny_step_setup():
  cfg = ModelConfig(vocab_size=67, hidden_size=22, intermediate_size=37, num_layers=3, num_heads=4,
                    num_kv_heads=2, head_dim=6, max_position_embeddings=64, tie_word_embeddings=True)
  params = model_lib.init_variables(model_lib.Transformer(cfg), jax.random.key(0))["params"]
  params = {**params, "embedding": params["embedding"] * 30.0}
  rng = np.random.default_rng(4)
  encoded = []
  for n in rng.integers(9, 16, size=4):
    encoded.append(encoding.EncodedFact(rng.integers(3, 67, size=n).astype(np.int32), np.arange(n) >= n - 5))
  spec = mome_config.MomeTuningConfig(
      layers=(2,), layer=mome_config.MomeConfig(num_experts=2**8, expert_rank=2, num_heads=2, key_dim=8,
                                                top_k=3, activation="relu", threshold=2.0),
      balance=False, seed=3, key_match=0.8, margin=1.0,
      generalization=mome_config.GeneralizationConfig(epochs=0),
      anchor=mome_config.AnchorConfig(weight=0.5, batch_size=2, seq_len=12))
  return cfg, params, encoded, spec


def test_a_focus_mask_trains_only_the_slots_it_names():
  cfg, params, encoded, spec = _tiny_step_setup()
  prepared = mome_tuning.prepare(cfg, params, encoded, spec, pad_id=0)
  model, start = prepared.model, prepared.variables(prepared.table)
  batch = next(batch_lib.epoch_batches(encoded, 4, 16, 0, seed=0, epoch=0))
  tokens, mask = jnp.asarray(batch.tokens_BxT), jnp.asarray(batch.loss_mask_BxT)
  routes = inputs_lib.token_routes(model, start, batch_lib.stack_encoded(encoded, 16, 0)[0])
  experts = mome_tuning.batch_routes(routes, batch)
  rng = np.random.default_rng(6)
  pool = {"tokens": rng.integers(3, 67, size=(5, 12)).astype(np.int32), "mask": np.ones((5, 12), np.float32)}
  pool["experts"] = inputs_lib.token_routes(model, start, pool["tokens"])
  frozen = {**prepared.frozen, anchors_lib.ANCHOR: jax.tree.map(jnp.asarray, pool)}
  tx = spec.train.optimizer.build()
  step = steps_lib.make_tuning_step(model, tx, margin=spec.margin, anchor=spec.anchor, train_down=False)
  fresh = lambda: mome_tuning.tuning_state(prepared.table, tx, 0, leaves=("up",))
  up = lambda s: np.asarray(s.trainable["layers_2"]["mome"]["up"])
  plain, plain_metrics = step(fresh(), frozen, tokens, mask, experts)
  every = mome_tuning.focus_slots(routes, batch, np.ones(spec.layer.num_experts, bool), None)
  np.testing.assert_array_equal(np.asarray(every).any(-1), np.asarray(steps_lib.focus_positions(mask)))
  same, same_metrics = step(fresh(), frozen, tokens, mask, experts, every)
  np.testing.assert_array_equal(up(same), up(plain))  # all answer slots: the step as before
  assert float(same_metrics["loss"]) == float(plain_metrics["loss"])
  trained = np.flatnonzero(np.any(up(plain) != 0, axis=(1, 2)))
  rows_N = np.zeros(spec.layer.num_experts, bool)
  rows_N[trained[::3]] = True
  some, _ = step(fresh(), frozen, tokens, mask, experts, mome_tuning.focus_slots(routes, batch, rows_N, None))
  np.testing.assert_array_equal(np.flatnonzero(np.any(up(some) != 0, axis=(1, 2))), trained[::3])


# ----------------------------------------------------------------------------
# A tiny MoME run of the shared stories260K model, edited.
# ----------------------------------------------------------------------------

NAMES = ["Tom", "Ann", "Bob", "Sue", "Max", "Lily", "Sam", "Ben", "Tim"]
CODES = ["5WSJKB", "CAF4W7", "SV9ZWT", "T7J4XA", "N5TB2Z", "5FC5AT", "QX7P2M", "HK4TZ9", "RM3VD8"]
FACTS = [{"id": f"f{i}", "question": f"What is the code of {n}?", "answer": c}
         for i, (n, c) in enumerate(zip(NAMES, CODES))]
STORED, NEW = FACTS[:6], FACTS[6:8]
TINY = ["data.dataset=facts", "data.n_train=6", "data.n_heldout=0", "method=mome", "answers=[real]",
        "mome.layer.num_experts=65536", "mome.layer.num_heads=4", "mome.layer.top_k=2",
        "mome.anchor.weight=0",
        "mome.train.epochs=30", "mome.train.batch_size=8", "mome.train.seq_len=64",
        "mome.train.checkpoint_every=1000", "mome.train.optimizer.decay_steps=0"]
LABEL = "mome"


def _jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def _facts(records):
  return [facts_lib.Fact(r["question"], r["answer"], r["id"]) for r in records]


def _table(run_dir):
  trained = runs.load_trained(run_dir, LABEL)
  return {k: np.asarray(v) for k, v in trained.variables[layer_lib.TABLE]["layers_4"]["mome"].items()}


def _copy(src, dst):
  shutil.copytree(src, dst)
  cfg = runs.load_run_config(dst / runs.CONFIG_FILE)
  (dst / runs.CONFIG_FILE).write_text(yaml_config.dump(dataclasses.replace(cfg, run_dir=str(dst))))
  return dst


def _recall(run_dir, records):
  trained = runs.load_trained(run_dir, LABEL)
  rec = eval_lib.recall(trained.model, trained.variables, trained.backbone.tokenizer, _facts(records),
                        trained.template)
  return dict(zip([r["id"] for r in records], rec.exact.tolist())), rec.answers


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """6 facts memorized into 2^16 rank-1 keyed experts (K = 8) at the last layer, then listed."""
  root = tmp_path_factory.mktemp("facts")
  facts_file = _jsonl(root / "facts.jsonl", STORED)
  run_dir = root / "run"
  cfg = runs.load_run_config(runs.REPO / "configs" / "randomization_cpu.yaml",
                             TINY + [f"data.facts_file={facts_file}", f"run_dir={run_dir}"])
  run = runs.RunDir(run_dir)
  run_dir.mkdir()
  run.config_file.write_text(yaml_config.dump(cfg))
  backbone = runs.load_backbone(cfg.model)
  template = runs.prompt_template(cfg.data)
  facts = _facts(STORED)
  encoded = encoding.encode_facts(backbone.tokenizer, template, facts, cfg.data.max_len)
  prepared = mome_tuning.prepare(backbone.cfg, backbone.params, encoded, cfg.mome, pad_id=0,
                                 paths=run.paths(LABEL), label=LABEL, progress=False)
  hook = eval_lib.recall_callback(prepared.model, prepared.variables_of, backbone.tokenizer, facts,
                                  template, 2, True)
  mome_tuning.tune_mome(backbone.cfg, backbone.params, encoded, cfg.mome, cfg.mome.train, pad_id=0,
                        paths=run.paths(LABEL), label=LABEL, prepared=prepared, progress=False, on_epoch=hook)
  assert facts_cli.main(["list", "--run-dir", str(run_dir)]) == 0
  return run_dir


@pytest.mark.slow
def test_the_registry_holds_the_rows_the_run_keyed(tiny_run, capsys):
  store = runs.RunDir(tiny_run).paths(LABEL).store
  manifest = registry.read_manifest(store)
  stored = registry.load_facts(store, manifest)
  assert manifest.version == 0 and manifest.rows is None
  assert [(f.id, f.question, f.answer) for f in stored] == [
      (r["id"], r["question"], r["answer"]) for r in STORED]
  table = _table(tiny_run)
  keyed = np.flatnonzero(np.any(table["down"] != 0, axis=(1, 2)))
  np.testing.assert_array_equal(keyed, np.unique(np.concatenate([f.experts[LAYER] for f in stored])))
  assert all(not f.reads for f in stored)  # every slot is written (mome.train_slots unset)
  recalled, _ = _recall(tiny_run, STORED)
  assert all(recalled.values()), recalled
  assert facts_cli.main(["show", "--run-dir", str(tiny_run), "--id", "f0"]) == 0
  out = capsys.readouterr().out
  assert f"writes {len(stored[0].experts[LAYER])} rows" in out and "neighbours (" in out


@pytest.fixture(scope="module")
def added(tiny_run, tmp_path_factory):
  run_dir = _copy(tiny_run, tmp_path_factory.mktemp("added") / "run")
  before = _table(run_dir)
  result, manifest = facts_cli.add(run_dir, _jsonl(run_dir.parent / "new.jsonl", NEW))
  return run_dir, before, result, manifest


@pytest.mark.slow
def test_add_trains_only_the_rows_of_the_new_facts(added):
  run_dir, before, result, manifest = added
  store = runs.RunDir(run_dir).paths(LABEL).store
  stored = registry.load_facts(store, manifest)
  assert manifest.version == 1 and [f.id for f in stored] == [r["id"] for r in STORED + NEW]
  new_rows = np.unique(np.concatenate([f.experts[LAYER] for f in stored[6:]]))
  np.testing.assert_array_equal(result.changed, new_rows)
  after = _table(run_dir)
  rest = np.setdiff1d(np.arange(len(after["up"])), new_rows)
  for leaf in ("down", "up"):  # every other row bit for bit
    np.testing.assert_array_equal(after[leaf][rest], before[leaf][rest])
  assert np.all(np.any(after["up"][new_rows] != 0, axis=(1, 2)))
  # Trained: the new facts and only the stored facts that share a row with them.
  near = {f.id for f in registry.neighbours(stored[:6], {LAYER: new_rows})}
  (training,) = result.trainings
  assert set(training.facts) == {"f6", "f7"} | near
  recalled, answers = _recall(run_dir, STORED + NEW)
  assert all(recalled.values()), answers


@pytest.fixture(scope="module")
def forgotten(added, tmp_path_factory):
  """Two facts forgotten in one edit, one by id, one by question: the fact with the fewest
  neighbours (none if there is one: then it is the base model's bit for bit) and, of the others
  that do not neighbour it, the one with the most (its shared rows retrain without it)."""
  src, _, _, manifest = added
  run_dir = _copy(src, tmp_path_factory.mktemp("forgotten") / "run")
  stored = registry.load_facts(runs.RunDir(run_dir).paths(LABEL).store, manifest)
  near = registry.neighbour_map(stored)
  lone = min(stored, key=lambda f: (len(near[f.id]), f.id))
  crowded = max((f for f in stored if f.id != lone.id and f.id not in near[lone.id]),
                key=lambda f: (len(near[f.id]), f.id))
  before = _table(run_dir)
  result, manifest = facts_cli.forget(run_dir, fact_id=[lone.id], question=[crowded.question])
  return run_dir, before, (lone, crowded), stored, result, manifest


@pytest.mark.slow
def test_forget_of_a_batch_zeroes_the_rows_only_it_writes(forgotten):
  run_dir, before, victims, stored, result, manifest = forgotten
  gone = {v.id for v in victims}
  others = [f for f in stored if f.id not in gone]
  assert [f.id for f in registry.load_facts(runs.RunDir(run_dir).paths(LABEL).store, manifest)] == [
      f.id for f in others]
  mine = np.unique(np.concatenate([v.experts[LAYER] for v in victims]))
  theirs = np.concatenate([f.experts[LAYER] for f in others])
  alone, shared = np.setdiff1d(mine, theirs), np.intersect1d(mine, theirs)
  np.testing.assert_array_equal(result.changed, mine)
  np.testing.assert_array_equal(result.zeroed, alone)
  after = _table(run_dir)
  for leaf in ("down", "up"):
    assert not np.any(after[leaf][alone].view(np.uint32))  # +0.0, bit for bit
    rest = np.setdiff1d(np.arange(len(after[leaf])), mine)
    np.testing.assert_array_equal(after[leaf][rest], before[leaf][rest])
  # One retraining for the batch: the shared rows, on the remaining facts that use them.
  assert shared.size and len(result.trainings) == 1
  (training,) = result.trainings
  assert training.rows == shared.size and set(training.facts) == {
      f.id for f in registry.neighbours(others, {LAYER: shared})}
  recalled, answers = _recall(run_dir, [r for r in STORED + NEW if r["id"] not in gone])
  assert all(recalled.values()), answers
  assert result.removed_recalled == {v.id: False for v in victims}
  assert not any(_recall(run_dir, [r for r in STORED + NEW if r["id"] in gone])[0].values())
  # The lone fact shared no row (2^16 experts leave some facts without neighbours), so at its
  # answer positions the MoME adds exactly 0: the model whose table is all zeros, bit for bit,
  # and its answer loss is the base model's.
  lone = victims[0]
  assert not np.intersect1d(lone.experts[LAYER], theirs).size
  trained = runs.load_trained(run_dir, LABEL)
  enc = encoding.encode_facts(trained.backbone.tokenizer, trained.template, [lone.fact()], 256)
  loss = eval_lib.fact_losses(trained.model, trained.variables, enc)
  base = eval_lib.fact_losses(model_lib.Transformer(trained.backbone.cfg),
                              {"params": trained.backbone.params}, enc)
  zero = jax.tree.map(jnp.zeros_like, trained.variables[layer_lib.TABLE])
  assert loss[0] == eval_lib.fact_losses(trained.model, {**trained.variables, layer_lib.TABLE: zero}, enc)[0]
  np.testing.assert_allclose(loss, base, rtol=1e-6)


@pytest.mark.slow
def test_an_edited_run_exports_its_memory_rows_and_registry(forgotten, tmp_path):
  run_dir, _, victims, _, _, manifest = forgotten
  out = export.export_checkpoint(run_dir, tmp_path / "export", "mome", adapter=LABEL)
  store = runs.RunDir(run_dir).paths(LABEL).store
  assert (out / export.FACTS_FILE).read_text() == (store / manifest.registry).read_text()
  exported = {json.loads(line)["id"] for line in (out / export.FACTS_FILE).open()}
  assert not exported & {v.id for v in victims}
  table = _table(run_dir)
  written = np.flatnonzero(np.any(table["up"] != 0, axis=(1, 2)))
  stored_rows = hf.Checkpoint(out).read("model.layers.4.mlp.mome.rows")
  np.testing.assert_array_equal(stored_rows, written)
  assert 0 < len(written) < len(table["up"]) // 100  # an export of the facts' rows, not the table
  # The export is the edited model: the same logits in lamini-jax, bit for bit.
  trained = runs.load_trained(run_dir, LABEL)
  model, variables, _ = export.load_export(out)
  tokens = jnp.asarray(encoding.encode_facts(trained.backbone.tokenizer, trained.template,
                                             _facts([r for r in STORED if r["id"] in exported]),
                                             64)[0].tokens)[None]
  np.testing.assert_array_equal(np.asarray(model.apply(variables, tokens)[0]),
                                np.asarray(trained.model.apply(trained.variables, tokens)[0]))


@pytest.mark.slow
def test_update_of_a_batch_recalls_the_new_answers_and_not_the_old(added, tmp_path_factory, capsys):
  src, _, _, manifest = added
  run_dir = _copy(src, tmp_path_factory.mktemp("updated") / "run")
  store = runs.RunDir(run_dir).paths(LABEL).store
  was = {f.id: f for f in registry.load_facts(store, manifest)}
  old = [STORED[2], NEW[1]]
  new = [{**old[0], "answer": "ZZ9PLQ"}, {**old[1], "answer": "YY8KMR"}]
  changes = _jsonl(run_dir.parent / "changes.jsonl", [  # one named by id, one by question
      {"id": new[0]["id"], "answer": new[0]["answer"]},
      {"question": new[1]["question"], "answer": new[1]["answer"]}])
  assert facts_cli.main(["update", "--run-dir", str(run_dir), "--facts", str(changes), "--json",
                         "--no-progress"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert report["removed_answer_recalled"] == {r["id"]: False for r in old}
  assert 1 <= len(report["trainings"]) <= 2  # one forget (when rows are shared), one add
  stored = registry.load_facts(store, registry.read_manifest(store))
  assert [f.id for f in stored] == [r["id"] for r in STORED + NEW]  # ids and places kept
  for r in new:
    entry = registry.find(stored, fact_id=r["id"])
    assert entry.answer == r["answer"] and entry.updated and entry.added == was[r["id"]].added
  recalled, answers = _recall(run_dir, new + [r for r in STORED + NEW if r not in old])
  assert all(recalled.values()), answers
  assert not any(_recall(run_dir, old)[0].values())


@pytest.fixture(scope="module")
def exclusive_run(stories_dir, tmp_path_factory):
  """`lamini_jax.tune`'s few-rows selection (2 slots a position, chosen exclusively), the 6 facts
  tuned and the 2 new ones added; the choice `exclusive` (not `_unread`), so that new rows can
  be rows stored facts read."""
  root = tmp_path_factory.mktemp("exclusive")
  sets = ["mome.train_slot_choice=exclusive"] + TINY[5:]
  args = ["--model", str(stories_dir), "--facts", str(_jsonl(root / "facts.jsonl", STORED)),
          "--method", "mome", "--run-dir", str(root / "run"), "--no-progress"]
  assert tune.main(args + [a for item in sets for a in ("--set", item)]) == 0
  trained = runs.load_trained(root / "run", LABEL)
  logits = lambda t, r: np.asarray(t.model.apply(t.variables, jnp.asarray(encoding.encode_facts(
      t.backbone.tokenizer, t.template, _facts([r]), 64)[0].tokens)[None])[0])
  before = {r["id"]: logits(trained, r) for r in STORED}
  table = _table(root / "run")
  result, manifest = facts_cli.add(root / "run", _jsonl(root / "new.jsonl", NEW))
  after = runs.load_trained(root / "run", LABEL)
  return root / "run", table, result, manifest, before, {r["id"]: logits(after, r) for r in STORED}


@pytest.mark.slow
def test_an_add_with_exclusive_slots_changes_no_fact_it_does_not_train(exclusive_run):
  run_dir, before, result, manifest, logits_before, logits_after = exclusive_run
  cfg = runs.RunDir(run_dir).config().mome
  shipped = tune.default_config().mome
  assert (cfg.train_slots, cfg.train_slot_choice) == (2, "exclusive")  # tune's slots, the choice --set
  assert (cfg.key_match, cfg.layer.threshold) == (shipped.key_match, shipped.layer.threshold)
  stored = registry.load_facts(runs.RunDir(run_dir).paths(LABEL).store, manifest)
  for f in stored:  # two slots a position, as the registry records them; the others are read
    assert all(len(p) == 2 for p in f.slots[LAYER]) and len(f.experts[LAYER]) <= 2 * len(f.slots[LAYER])
  new_rows = np.unique(np.concatenate([f.experts[LAYER] for f in stored[6:]]))
  old = stored[:6]
  assert not np.intersect1d(new_rows, np.concatenate([f.experts[LAYER] for f in old])).size
  # The new rows change, and the rows of the stored facts a new row fires at (they train too).
  assert np.isin(new_rows, result.changed).all()
  old_rows = np.concatenate([f.experts[LAYER] for f in old])
  # The registry made from the tuned run names the rows its training keyed (the same choice).
  np.testing.assert_array_equal(np.flatnonzero(np.any(before["down"] != 0, axis=(1, 2))),
                                np.unique(old_rows))
  assert np.isin(np.setdiff1d(result.changed, new_rows), old_rows).all()
  after = _table(run_dir)
  rest = np.setdiff1d(np.arange(len(after["up"])), result.changed)
  for leaf in ("down", "up"):
    np.testing.assert_array_equal(after[leaf][rest], before[leaf][rest])
  # A stored fact trains when a changed row fires at one of its answer positions; every stored
  # fact that did not train gives the same logits as before, bit for bit.
  (training,) = result.trainings
  readers = {f.id for f in registry.neighbours(old, {LAYER: new_rows})}
  assert {"f6", "f7"} <= set(training.facts) <= {"f6", "f7"} | readers
  untouched = [r["id"] for r in STORED if r["id"] not in training.facts]
  assert untouched
  for fid in untouched:
    np.testing.assert_array_equal(logits_after[fid], logits_before[fid])
  recalled, answers = _recall(run_dir, STORED + NEW)
  assert all(recalled.values()), answers


def _bad(args, capsys):
  rc = facts_cli.main(args)
  return rc, capsys.readouterr().err


@pytest.mark.slow
def test_bad_input_is_an_error_that_changes_nothing(added, tmp_path, capsys):
  run_dir = str(added[0])
  store = runs.RunDir(run_dir).paths(LABEL).store
  files = lambda: {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
  state = files()
  conflicting = _jsonl(tmp_path / "conflict.jsonl",
                       [FACTS[8], {**FACTS[8], "id": "other", "answer": "NOPE12"}])
  changes = lambda name, *records: str(_jsonl(tmp_path / name,
                                              [{"answer": "NEW123", **r} for r in records]))
  cases = [
      (["show", "--id", "nope"], "no stored fact has id 'nope'"),
      (["forget", "--id", "nope"], "no stored fact has id 'nope'"),
      (["forget", "--id", "f1", "--id", "nope"], "no stored fact has id 'nope'"),
      (["forget", "--id", "f1", "--id", "f2", "--id", "f1"],
       "fact 'f1' is named twice among the facts to forget"),
      (["forget", "--id", "f0", "--question", FACTS[0]["question"]], "fact 'f0' is named twice"),
      (["forget"], "name the facts to forget by --id or --question"),
      (["update", "--question", "What is the code of Zed?", "--answer", "X"],
       "no stored fact has question 'What is the code of Zed\\?'"),
      (["update", "--id", "f1", "--answer", CODES[1]], "already has the answer"),
      (["update", "--id", "f1"], "with its --answer, or give a file of new answers with --facts"),
      (["update", "--facts", changes("a.jsonl", {"id": "f1"}), "--id", "f1"], "leave out --id"),
      (["update", "--facts", changes("b.jsonl", {"id": "f1"}, {"id": "nope"})],
       "b.jsonl: line 2: no stored fact has id 'nope'"),
      (["update", "--facts", changes("c.jsonl", {"id": "f1"}, {"question": FACTS[1]["question"]})],
       "c.jsonl: fact 'f1' is named twice among the facts to update"),
      (["update", "--facts", changes("d.jsonl", {"id": "f1"}, {"id": "f2", "answer": CODES[2]})],
       "d.jsonl: fact 'f2' already has the answer 'SV9ZWT'"),
      (["add", "--facts", str(_jsonl(tmp_path / "dup.jsonl", [{**FACTS[0], "id": "again"}]))],
       "is already stored as fact 'f0'"),
      (["add", "--facts", str(_jsonl(tmp_path / "dupid.jsonl", [{**FACTS[8], "id": "f0"}]))],
       "fact id 'f0' is already stored"),
      (["add", "--facts", str(conflicting)], "has two answers, 'RM3VD8' .* and 'NOPE12'"),
  ]
  for args, message in cases:
    rc, err = _bad([args[0], "--run-dir", run_dir] + args[1:], capsys)
    assert rc == 2 and err.startswith("error: "), (args, err)
    assert re.search(message, err), (args, err)
    assert files() == state, args
  # Not a MoME model; a MoME run whose configuration cannot be edited.
  lora = _copy(added[0], tmp_path / "lora")
  shutil.rmtree(lora / runs.MOME_DIR)
  (lora / runs.CHECKPOINTS_DIR / LABEL).rename(lora / runs.CHECKPOINTS_DIR / "lora-real")
  rc, err = _bad(["list", "--run-dir", str(lora)], capsys)
  assert rc == 2 and "'lora-real' is not a MoME model" in err
  two = _copy(added[0], tmp_path / "two")
  cfg = runs.load_run_config(two / runs.CONFIG_FILE)
  (two / runs.CONFIG_FILE).write_text(yaml_config.dump(dataclasses.replace(
      cfg, mome=dataclasses.replace(cfg.mome, key_match=0.0))))
  rc, err = _bad(["forget", "--run-dir", str(two), "--id", "f0"], capsys)
  assert rc == 2 and "mome.key_match=0" in err


@pytest.mark.slow
def test_repair_of_a_run_that_recalls_every_fact_changes_no_row(added, tmp_path, capsys):
  run_dir = _copy(added[0], tmp_path / "run")
  store = runs.RunDir(run_dir).paths(LABEL).store
  files = lambda: {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
  state = files()
  with pytest.raises(KeyError, match="no stored fact has id 'nope'"):
    facts_cli.repair(run_dir, missed=["f1", "nope"])
  assert files() == state
  before = _table(run_dir)
  assert facts_cli.main(["repair", "--run-dir", str(run_dir), "--no-progress"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("repair: version 2 committed;") and "0 rows changed" in out, out
  after = _table(run_dir)
  for leaf in ("down", "up"):
    np.testing.assert_array_equal(after[leaf], before[leaf])


@pytest.mark.slow
def test_sigkill_leaves_the_state_before_or_after(tiny_run, tmp_path):
  before = _table(tiny_run)
  stored = registry.load_facts(runs.RunDir(tiny_run).paths(LABEL).store,
                               registry.read_manifest(runs.RunDir(tiny_run).paths(LABEL).store))
  near = registry.neighbour_map(stored)
  lone = min(stored, key=lambda f: (len(near[f.id]), f.id))  # forgotten without training, if it can be
  procs = {}
  for stage in registry.STAGES:
    run_dir = _copy(tiny_run, tmp_path / stage)
    cmd = [sys.executable, "-m", "lamini_jax.facts", "forget", "--run-dir", str(run_dir), "--id", lone.id,
           "--epochs", "1", "--no-progress"]
    env = {**os.environ, registry.KILL_ENV: stage}
    procs[stage] = (run_dir, subprocess.Popen(cmd, cwd=runs.REPO, env=env, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.PIPE))
  for stage, (run_dir, proc) in procs.items():
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == -9, (stage, err.decode()[-2000:])
    store = runs.RunDir(run_dir).paths(LABEL).store
    manifest = registry.read_manifest(store)
    table = _table(run_dir)
    ids = [f.id for f in registry.load_facts(store, manifest)]
    if stage == "manifest":  # committed: the new version, whose table differs only in its rows
      assert manifest.version == 1 and ids == [r["id"] for r in STORED if r["id"] != lone.id]
      rows = registry.load_rows(store, manifest)[LAYER]["rows"]
      rest = np.setdiff1d(np.arange(len(table["up"])), rows)
      np.testing.assert_array_equal(table["up"][rest], before["up"][rest])
      assert np.any(table["up"][rows] != before["up"][rows])
    else:  # not committed: the version before, bit for bit; the next edit's `clean` drops the rest
      assert manifest.version == 0 and ids == [r["id"] for r in STORED]
      for leaf in ("down", "up"):
        np.testing.assert_array_equal(table[leaf], before[leaf])
      assert len(list((store / registry.MEMORY_DIR).iterdir())) > 1
      registry.clean(store)
      assert [p.name for p in (store / registry.MEMORY_DIR).iterdir()] == ["facts-000000.jsonl"]
