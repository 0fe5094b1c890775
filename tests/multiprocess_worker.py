"""Sharded MoME tuning and its Orbax round trip, the same in one process or in several.

`tests/multiprocess_test.py` runs this file as a script in 2 processes of 4
simulated CPU devices each (it sets XLA_FLAGS before jax is imported), and
calls `train` and `restore` itself in its own process of 8 devices:

  python tests/multiprocess_worker.py --out DIR --mesh 2,4 --mesh 1,8 \\
      --coordinator localhost:PORT --num-processes 2 --process-id I

Every process calls `jax.distributed.initialize`, then for each mesh `train`:
prepare a tiny MoME on the global (data, expert) mesh (`mome_tuning.prepare`),
run STEPS_BEFORE sharded tuning steps on a fixed batch, save the state with
`lamini_jax.checkpoint.Checkpointer`, restore it into a fresh state and run
STEPS_AFTER more steps from the restored one. Process 0 writes the losses and
digests to DIR/result.json. A digest is float64 sums of every table and
optimizer-state leaf, computed by a jitted reduction over the sharded array:
no process ever holds a whole table.
"""

import argparse
import json
import pathlib
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from lamini_jax.checkpoint import Checkpointer
from lamini_jax.config import ModelConfig
from lamini_jax.data import batches as batch_lib
from lamini_jax.data import encoding
from lamini_jax import model as model_lib
from lamini_jax.mome import config as mome_config
from lamini_jax.mome import layer as layer_lib
from lamini_jax.mome import steps as steps_lib
from lamini_jax.mome import tuning as mome_tuning
from lamini_jax import sharding
from lamini_jax import train as train_lib

# The tiny model of tests/mome_tuning_test.py (odd widths), two layers, a MoME of 2^8 experts on the last.
CFG = ModelConfig(vocab_size=67, hidden_size=22, intermediate_size=37, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=6, max_position_embeddings=64, tie_word_embeddings=True)
SEQ = 16
NUM_FACTS = 6  # one fixed batch of 6 * 16 tokens, split over data = 2
TRAIN = train_lib.TrainConfig(
    epochs=1, batch_size=NUM_FACTS, seq_len=SEQ, seed=1, length_bucket=None,
    optimizer=train_lib.OptimizerConfig(learning_rate=0.2, multiply_by_parameter_scale=False))
SPEC = mome_config.MomeTuningConfig(
    layers=(1,), layer=mome_config.MomeConfig(num_experts=2**8, expert_rank=2, num_heads=2, key_dim=8,
                                              top_k=3, activation="silu"),
    balance=False, margin=1.0, seed=3, generalization=mome_config.GeneralizationConfig(epochs=0),
    train=TRAIN)
STEPS_BEFORE = 2  # steps before the checkpoint
STEPS_AFTER = 2  # steps from the restored state
SAVED_STEP = STEPS_BEFORE


def encoded_facts() -> list[encoding.EncodedFact]:
  """NUM_FACTS sequences of 9-15 tokens; the last 5 of each are the trained answer."""
  rng = np.random.default_rng(4)
  out = []
  for n in rng.integers(9, SEQ, size=NUM_FACTS):
    tokens = rng.integers(3, CFG.vocab_size, size=n).astype(np.int32)
    out.append(encoding.EncodedFact(tokens, np.arange(n) >= n - 5))
  return out


def backbone_params() -> Any:
  """A random backbone drawn on the host (no init to compile), identical in every process.

  Norm scales are 1; every other leaf is normal with std 1 / sqrt(its leading
  dim), the embedding's rows of norm ~3 as in trained models.
  """
  rng = np.random.default_rng(0)
  abstract = nn.meta.unbox(model_lib.abstract_variables(model_lib.Transformer(CFG)))["params"]

  def one(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      return np.ones(leaf.shape, leaf.dtype)
    std = 0.7 if name == "['embedding']" else leaf.shape[0] ** -0.5
    return (std * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(one, abstract)


@jax.jit
def _sums(tree: Any) -> Any:
  """Per leaf: [sum, sum of squares, row-weighted sum] in float64 (a swap of two rows changes the last)."""

  def one(a):
    a = a.astype(jnp.float64)
    row = jnp.arange(1, a.shape[0] + 1, dtype=jnp.float64).reshape((-1,) + (1,) * (a.ndim - 1))
    return jnp.stack([jnp.sum(a), jnp.sum(a * a), jnp.sum(a * row)])

  return jax.tree.map(one, tree)


def state_leaves(state: train_lib.TrainState) -> dict[str, Any]:
  """What a digest covers: the expert tables and their per-row optimizer state."""
  return {"trainable": state.trainable, "opt_state": state.opt_state}


def digest(state: train_lib.TrainState) -> dict[str, list[float]]:
  """{leaf path: [sum, sum of squares, row-weighted sum]} of the table and its optimizer state.

  The sums run jitted on the sharded leaves (each device reduces its rows, then
  one all-reduce); only the replicated [3] results come to the host.
  """
  with jax.enable_x64(True):
    sums = _sums(state_leaves(state))
  return {jax.tree_util.keystr(path): [float(v) for v in np.asarray(leaf)]
          for path, leaf in jax.tree_util.tree_leaves_with_path(sums)}


def host_arrays(state: train_lib.TrainState) -> dict[str, np.ndarray]:
  """The table and optimizer-state leaves as host arrays (one process only: it holds them all)."""
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(state_leaves(state))}


def layout(mesh: Mesh) -> list[list[int]]:
  """The process holding each (data, expert) position of the mesh."""
  return [[d.process_index for d in row] for row in mesh.devices]


def _replicated(mesh: Mesh, tree: Any) -> Any:
  return jax.device_put(tree, NamedSharding(mesh, P()))


def train(mesh: Mesh, ckpt_dir: pathlib.Path) -> tuple[dict[str, Any], train_lib.TrainState]:
  """Steps, checkpoint, restore, more steps; returns (losses and digests, the state as saved)."""
  prepared = mome_tuning.prepare(CFG, backbone_params(), encoded_facts(), SPEC, pad_id=0, progress=False,
                                 mesh=mesh)
  table = jax.tree.map(lambda a: a + 0.1, prepared.table)  # nonzero up: a real forward and gradient
  tx = TRAIN.optimizer.build()
  fresh = lambda: mome_tuning.tuning_state(table, tx, TRAIN.seed, mesh)
  state = fresh()
  # Step and RNG replicated up front: a fresh state's are uncommitted, the step's outputs
  # replicated, so the step would otherwise compile twice.
  state = state.replace(step=_replicated(mesh, state.step), rng=_replicated(mesh, state.rng))
  step = steps_lib.make_tuning_step(prepared.model, tx, mesh, margin=SPEC.margin)
  tokens, mask = _replicated(mesh, batch_lib.stack_encoded(encoded_facts(), SEQ, 0))
  losses = []
  for _ in range(STEPS_BEFORE):
    state, metrics = step(state, prepared.frozen, tokens, mask)
    losses.append(float(metrics["loss"]))
  sharding.check_expert_sharded(state.trainable, mesh)
  sharding.check_expert_sharded(state.opt_state, mesh)
  saved_digest = digest(state)
  saved = state  # not donated: the steps below run on the restored state
  ckpt = Checkpointer(ckpt_dir, every=1)
  ckpt.save(SAVED_STEP, state, {"processes": jax.process_count()})
  restored = ckpt.restore(fresh())  # into the fresh state's shardings: as `train.fit` resumes
  ckpt.close()
  if restored is None:
    raise RuntimeError(f"{ckpt_dir}: no checkpoint after saving step {SAVED_STEP}")
  state, position = restored
  sharding.check_expert_sharded(state.trainable, mesh)
  sharding.check_expert_sharded(state.opt_state, mesh)
  restored_digest = digest(state)
  for _ in range(STEPS_AFTER):
    state, metrics = step(state, prepared.frozen, tokens, mask)
    losses.append(float(metrics["loss"]))
  return {"losses": losses, "saved": saved_digest, "restored": restored_digest, "final": digest(state),
          "position": position, "step": int(state.step), "layout": layout(mesh)}, saved


def restore(mesh: Mesh, ckpt_dir: pathlib.Path) -> train_lib.TrainState:
  """The state saved at SAVED_STEP in `ckpt_dir` (by any number of processes), on `mesh`.

  The state to restore into is abstract (`jax.eval_shape`, then shardings): no
  table is initialised just to be overwritten.
  """
  table = nn.meta.unbox(model_lib.abstract_variables(mome_tuning.mome_model(CFG, SPEC)))[layer_lib.TABLE]
  abstract = jax.eval_shape(lambda t: mome_tuning.tuning_state(t, TRAIN.optimizer.build(), TRAIN.seed),
                            table)
  with_sharding = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
  rows = lambda tree: jax.tree.map(with_sharding, tree, sharding.row_shardings(tree, mesh))
  like = abstract.replace(
      trainable=rows(abstract.trainable), opt_state=rows(abstract.opt_state),
      step=with_sharding(abstract.step, NamedSharding(mesh, P())),
      rng=with_sharding(abstract.rng, NamedSharding(mesh, P())))
  ckpt = Checkpointer(ckpt_dir, every=0)
  restored = ckpt.restore(like, step=SAVED_STEP)
  ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"{ckpt_dir}: no checkpoint at step {SAVED_STEP}")
  state = restored[0]
  sharding.check_expert_sharded(state.trainable, mesh)
  sharding.check_expert_sharded(state.opt_state, mesh)
  return state


def parse_mesh(text: str) -> tuple[int, int]:
  try:
    data, expert = (int(n) for n in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"--mesh {text!r}: expected DATA,EXPERT, e.g. 2,4") from None
  return data, expert


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, required=True,
                      help="folder for result.json and one checkpoint folder per mesh")
  parser.add_argument("--mesh", type=parse_mesh, action="append", required=True,
                      help="DATA,EXPERT; repeat for several meshes")
  parser.add_argument("--coordinator", help="host:port of process 0's coordinator service")
  parser.add_argument("--num-processes", type=int, default=1)
  parser.add_argument("--process-id", type=int, default=0)
  args = parser.parse_args(argv)
  # Cross-process collectives on CPU (already the default on jax 0.10: `jax._src.config`).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if args.num_processes > 1:
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                               initialization_timeout=60)
  result = {"process_count": jax.process_count(), "device_count": jax.device_count(),
            "local_device_count": jax.local_device_count()}
  for data, expert in args.mesh:
    if data * expert != jax.device_count():
      raise ValueError(f"--mesh {data},{expert}: {data * expert} devices, but {jax.device_count()} exist"
                       f" over {jax.process_count()} processes (set XLA_FLAGS="
                       "--xla_force_host_platform_device_count=N before jax is imported)")
    name = f"data{data}_expert{expert}"
    result[name] = train(sharding.make_mesh(data, expert), args.out / name)[0]
  if jax.process_index() == 0:
    (args.out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
  if args.num_processes > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv[1:])
