"""Orbax checkpoints of a training run: trainable state, optimizer state, data position, RNG.

One directory per run; each saved step holds the state pytree (`StandardSave`) and a
small JSON record of where the data loop was (`JsonSave`). Saves are atomic (Orbax
writes to a temporary directory and renames it), so a run killed at any moment
resumes from its last complete checkpoint.

Multi-process runs (`jax.distributed.initialize`, one process per host) save and
restore the same way: every process calls `save`/`restore` with its part of the
global arrays, each writes and reads only the shards it holds, and a state saved
on one mesh restores onto another (8 devices' table onto 4) through the
shardings of `like_state`.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import orbax.checkpoint as ocp


def restore_target(like_state: Any) -> Any:
  """ShapeDtypeStructs to restore into: each leaf's shape, dtype and sharding.

  An uncommitted leaf (one jax moves to wherever it is used, such as a fresh
  `TrainState`'s step and RNG) restores replicated on the mesh of the tree's
  mesh-sharded leaves, not pinned to one device: a restored state then feeds a
  step jitted on that mesh, as the state it replaces did.
  """
  mesh = next((leaf.sharding.mesh for leaf in jax.tree.leaves(like_state)
               if isinstance(getattr(leaf, "sharding", None), NamedSharding)), None)

  def one(leaf):
    if mesh is not None and not getattr(leaf, "committed", True):
      return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, P()))
    return ocp.utils.to_shape_dtype_struct(leaf)

  return jax.tree.map(one, like_state)


class Checkpointer:
  """Saves every `every` steps, keeps the newest `keep`; restores the latest."""

  def __init__(self, directory: os.PathLike, every: int, keep: int = 2):
    if every < 0:
      raise ValueError(f"checkpoint_every must be >= 0 (0 = never), got {every}")
    self.directory = pathlib.Path(directory).resolve()
    self.every = every
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))

  def due(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state: Any, position: dict[str, Any]) -> None:
    """Saves; a checkpoint already at `step` (e.g. mid-epoch, now final) is replaced."""
    if step in self._manager.all_steps():
      self._manager.delete(step)
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), position=ocp.args.JsonSave(position)), force=True)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, like_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]] | None:
    """(state, position) of `step` (default latest), or None when there is none."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    abstract = restore_target(like_state)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), position=ocp.args.JsonRestore()))
    return out.state, dict(out.position)

  def restore_trainable(self, like_trainable: Any, step: int | None = None) -> Any | None:
    """Only the `trainable` part of a saved train state (default latest step), or None.

    `like_trainable` may be abstract (`jax.ShapeDtypeStruct`s, with shardings to
    restore onto): the optimizer state is never read, so loading a trained model
    needs neither an optimizer nor its state's shapes.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # one this process holds
    abstract = {"trainable": jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None) or local),
        like_trainable)}
    out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True)))
    return out.state["trainable"]

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
