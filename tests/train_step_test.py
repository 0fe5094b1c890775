"""The train-step benchmark's report (`benchmarks.train_step`); the timings themselves are a
benchmark, run by hand and by `benchmarks.gpu_check`."""

from benchmarks import train_step
from lamini_jax.config import llama3_8b


def test_table_reports_the_mome_layer_and_derives_rate_and_mfu_from_the_step_time():
  bench = train_step.BenchConfig(layers=2, batches=(4,), experts=2**12).resolved("cpu")
  peak = train_step.Peak(flops=1e12, label="a made-up 1 TFLOP/s")
  row = {"method": "mome", "batch": 4, "trained_params": 3e6, "active_params": 2e5,
         "flops_per_token": 2e9, "step_s": 0.5, "min_s": 0.4, "max_s": 0.7, "compile_s": 3.0,
         "xla_flops": 4 * bench.seq * 2.5e9}
  oom = {"method": "lora", "batch": 64, "trained_params": 2e7, "active_params": 2e7,
         "flops_per_token": 9e9, "oom": "RESOURCE_EXHAUSTED"}
  text = train_step.format_table(bench, llama3_8b(2), peak, [row, oom])
  spec = bench.mome_spec().layer
  assert f"mome: {2**12} experts of rank {spec.expert_rank}" in text
  assert f"{spec.num_heads}x{spec.top_k} slots per token" in text
  tokens_per_s = 4 * bench.seq / 0.5
  line = next(l for l in text.splitlines() if l.startswith("| mome |"))
  cells = [c.strip() for c in line.strip("|").split("|")]
  assert cells[4] == "500 (400-700)"
  assert cells[5] == f"{tokens_per_s:,.0f}"
  assert cells[7] == f"{tokens_per_s * 2e9 / 1e12:.1%}"
  assert cells[8] == "2.50"
  assert "| lora | 64 x" in text and "out of memory" in text
