"""Two processes (jax.distributed, gloo CPU collectives) tune, save and restore a MoME as one process does.

`multiprocess_worker.py` runs in 2 processes of 4 simulated CPU devices each:
on the global 8-device mesh, both as (data 2, expert 4) (data split across
the processes) and as (data 1, expert 8) (each process holds half of every
expert table), it prepares a tiny MoME, runs sharded tuning steps, saves the
state with Orbax, restores it and steps on. This process (8 devices, from
conftest) runs the same `train` meanwhile; losses and float64 digests must
agree. Then both checkpoints restore onto a 4-device mesh. (The last test, not
slow, is the restore fix those runs rely on, in one process.)

Tolerance: rtol 1e-6, about 8 float32 ulps (eps = 1.2e-7). Both runs execute the
same SPMD program over the same (data, expert) positions; only the collectives
differ (gloo across processes, in-process copies otherwise), so at most their
summation order can move a float32 result by a few ulps per step. Measured: the
losses agree bit for bit and the digests to float64 rounding (1e-16).
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

import multiprocess_worker as worker
from lamini_jax.checkpoint import Checkpointer
from lamini_jax import sharding

WORKER = pathlib.Path(worker.__file__)
MESHES = ((2, 4), (1, 8))
NAMES = [f"data{d}_expert{e}" for d, e in MESHES]
# The process of each mesh position: data split across the processes, or each holding 4 of 8 expert shards.
LAYOUTS = {"data2_expert4": [[0] * 4, [1] * 4], "data1_expert8": [[0] * 4 + [1] * 4]}
TIMEOUT_S = 400  # a hung collective fails the test instead of blocking CI (the run takes ~40 s alone)
RTOL = 1e-6  # see the module docstring


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _log_tail(path: pathlib.Path, lines: int = 30) -> str:
  kept = [line for line in path.read_text(errors="replace").splitlines() if not line.startswith("[Gloo]")]
  return "\n".join(kept[-lines:])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(result.json of the 2-process run, {mesh name: (result, state as saved)} of this process, folders)."""
  assert jax.device_count() >= 8, "conftest must force 8 CPU devices"
  root = tmp_path_factory.mktemp("multiprocess")
  multi_dir, single_dir = root / "multi", root / "single"
  multi_dir.mkdir()
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, str(WORKER), "--out", str(multi_dir), "--coordinator", f"localhost:{_free_port()}",
         "--num-processes", "2"]
  for data, expert in MESHES:
    cmd += ["--mesh", f"{data},{expert}"]
  logs = [multi_dir / f"process{i}.log" for i in range(2)]
  procs = []
  try:
    for i, log in enumerate(logs):
      with open(log, "w") as f:
        procs.append(subprocess.Popen(cmd + ["--process-id", str(i)], env=env, stdout=f,
                                      stderr=subprocess.STDOUT, cwd=WORKER.parents[1]))
    deadline = time.monotonic() + TIMEOUT_S
    single = {name: worker.train(sharding.make_mesh(*shape), single_dir / name)
              for name, shape in zip(NAMES, MESHES)}
    for proc in procs:
      proc.wait(timeout=max(deadline - time.monotonic(), 1))
  except subprocess.TimeoutExpired:
    pytest.fail(f"the 2-process run took over {TIMEOUT_S} s; process 0 log:\n{_log_tail(logs[0])}")
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  for i, (proc, log) in enumerate(zip(procs, logs)):
    assert proc.returncode == 0, f"process {i} exited with {proc.returncode}:\n{_log_tail(log)}"
  multi = json.loads((multi_dir / "result.json").read_text())
  return multi, single, {"multi": multi_dir, "single": single_dir}


def _assert_digests_close(got, want, what):
  assert sorted(got) == sorted(want), what
  for leaf in want:
    np.testing.assert_allclose(got[leaf], want[leaf], rtol=RTOL, err_msg=f"{what}: {leaf}")


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_two_processes_tune_save_and_restore_as_one_process_does(runs, name):
  multi, single, _ = runs
  assert (multi["process_count"], multi["device_count"], multi["local_device_count"]) == (2, 8, 4)
  got, want = multi[name], single[name][0]
  assert got["layout"] == LAYOUTS[name] and want["layout"] == [[0] * len(r) for r in LAYOUTS[name]]
  np.testing.assert_allclose(got["losses"], want["losses"], rtol=RTOL)
  assert got["losses"][-1] < 0.6 * got["losses"][0]  # the steps train
  for key in ("saved", "restored", "final"):
    _assert_digests_close(got[key], want[key], f"{name} {key}")
  # The round trip changes no bit: the same program digests the same shards.
  assert got["restored"] == got["saved"] and want["restored"] == want["saved"]
  assert got["position"] == {"processes": 2} and want["position"] == {"processes": 1}
  assert got["step"] == want["step"] == worker.STEPS_BEFORE + worker.STEPS_AFTER


@pytest.mark.slow
def test_a_table_saved_on_8_devices_restores_onto_4(runs):
  multi, single, dirs = runs
  name = "data1_expert8"  # every expert table split 8 ways (over 2 processes, in the 2-process run)
  want = worker.host_arrays(single[name][1])
  mesh = sharding.make_mesh(1, 4)
  rows = worker.SPEC.layer.num_experts // 4
  for run in ("single", "multi"):
    state = worker.restore(mesh, dirs[run] / name)
    for leaf in jax.tree.leaves(worker.state_leaves(state)):
      assert {s.data.shape[0] for s in leaf.addressable_shards} == {rows}, run
    got = worker.host_arrays(state)
    assert sorted(got) == sorted(want)
    for leaf in want:
      if run == "single":  # the same bits, now 64 rows per device instead of 32
        np.testing.assert_array_equal(got[leaf], want[leaf], err_msg=f"{run}: {leaf}")
      else:  # written by 2 processes, a half each
        np.testing.assert_allclose(got[leaf], want[leaf], rtol=RTOL, err_msg=f"{run}: {leaf}")
    saved = multi[name]["saved"] if run == "multi" else single[name][0]["saved"]
    _assert_digests_close(worker.digest(state), saved, f"{run} restored")


def test_restore_puts_uncommitted_leaves_on_the_mesh_of_the_others(tmp_path):
  # A fresh TrainState's step is uncommitted (jax moves it where it is used); restored onto one
  # device it would clash with the mesh-sharded table in the jitted step, as resume used to.
  mesh = sharding.make_mesh(2, 4)
  table = jax.device_put(np.arange(24.0, dtype=np.float32).reshape(8, 3),
                         NamedSharding(mesh, sharding.row_spec(2)))
  like = {"table": table, "step": jnp.zeros((), jnp.int32)}
  assert not like["step"].committed
  ckpt = Checkpointer(tmp_path, every=1)
  ckpt.save(1, {"table": table * 2, "step": jnp.ones((), jnp.int32)}, {})
  restored, _ = ckpt.restore(like)
  ckpt.close()
  assert restored["step"].sharding == NamedSharding(mesh, P())
  assert restored["table"].sharding == table.sharding
  out = jax.jit(lambda s: s["table"] * s["step"])(restored)
  np.testing.assert_array_equal(np.asarray(out), 2 * np.arange(24.0).reshape(8, 3))
