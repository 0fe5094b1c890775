"""The prepared GPU check runs its steps and writes its report (smoke run, on the CPU)."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_smoke_run_writes_one_report(tmp_path):
  done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--out", str(tmp_path)],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  report = (tmp_path / "gpu_check.md").read_text()
  assert done.returncode == 0, report
  for step in ("environment", "kernels", "scatter-add", "scatter-add workaround", "gather_apply"):
    assert f"| {step} | ok |" in report, report
  kernels = (tmp_path / "kernels.log").read_text()
  # 2 dtypes x 2 ranks x 5 outputs (y, dx, dw, ddown, dup) of the interpreted Pallas kernels, all
  # within tolerance of the reference.
  assert kernels.count(" yes\n") == 20 and "0 failure(s)" in kernels
  assert "--xla_backend_extra_options=-nvptx-allow-ftz-atomics" in (tmp_path / "scatter_add_workaround.log").read_text()
