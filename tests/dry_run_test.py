"""The dry run: its figures against hand arithmetic, on a tiny config and on the paper-scale one (slow)."""

import json
import subprocess
import sys

import huggingface_hub
import pytest

from experiments import randomization
from lamini_jax import config as config_lib
from lamini_jax import dry_run
from lamini_jax import runs

PAPER = runs.REPO / "configs" / "llama3_8b_mome.yaml"
GIB = 2**30

# The CPU config's stories260K backbone (hidden 64) with a small MoME, every field the arithmetic
# below depends on pinned: 4096 rank-1 experts at layer 4, 8 heads of key width 32, keyed experts
# (phase 2 trains `up` alone), per-row Adafactor with a cosine schedule, tables over 8 devices.
TINY = ["method=mome", "mesh.data=1", "mesh.expert=8", "mome.layers=[4]", "mome.layer.num_experts=4096",
        "mome.layer.expert_rank=1", "mome.layer.num_heads=8", "mome.layer.top_k=3", "mome.layer.key_dim=32",
        "mome.layer.threshold=4.0", "mome.key_match=0.8", "mome.anchor.weight=0.1",
        "mome.anchor.batch_size=8", "mome.anchor.windows=16", "mome.anchor.questions=16",
        "mome.anchor.seq_len=64", "mome.train.batch_size=4", "mome.train.seq_len=32",
        "mome.train.optimizer.name=adafactor", "mome.train.optimizer.decay_steps=16"]


def _row_state_bytes(rows: int, width: int) -> int:
  # optax.adafactor on one `up` row [1, width]: not factored (a dimension < 128), so a second
  # moment per element, placeholder v_row and v_col of one float each, and its step count; the
  # cosine schedule (decay_steps) adds its own step count. All 4-byte.
  return rows * (width + 4) * 4


def test_tiny_config_from_the_command_line(monkeypatch, capsys):
  # `--dry-run` prints the table and exits before any data or weights are read.
  def never(*args, **kwargs):
    raise AssertionError("the dry run read data or weights")
  monkeypatch.setattr(runs, "load_backbone", never)
  monkeypatch.setattr(runs, "facts_and_heldout", never)
  captured = {}
  real = dry_run.dry_run
  monkeypatch.setattr(dry_run, "dry_run", lambda cfg, **kw: captured.setdefault("f", real(cfg, **kw)))
  argv = [a for item in TINY for a in ("--set", item)]
  assert randomization.main(argv + ["--dry-run", "--device-memory-gib", "0.5"]) == 0
  out = capsys.readouterr().out
  f = captured["f"]
  d, per_device = 64, 4096 // 8
  assert f["parameters"] == 260_032  # stories260K (shared/README.md)
  assert f["backbone_bytes"] == 260_032 * 4  # float32, replicated
  assert f["table_bytes"] == per_device * (d * 1 + 1 * d) * 4  # down [E, D, 1] + up [E, 1, D]
  assert f["row_state_bytes"] == _row_state_bytes(per_device, d)
  # query [D, 8, 32], keys1 and keys2 [8, 64, 16], biases [8, 64]: replicated float32.
  assert f["router_bytes"] == (d * 8 * 32 + 2 * 8 * 64 * 16 + 2 * 8 * 64) * 4
  # tokens and mask [4, 32] and their first-layer experts [4, 32, 24], the anchor pool [32, 64]
  # twice and its experts [32, 64, 24], step (int32), rng (2 x uint32).
  assert f["input_bytes"] == (2 + 24) * 4 * 32 * 4 + (2 + 24) * 32 * 64 * 4 + 4 + 8
  assert f["held_bytes"] == sum(f[k] for k in dry_run.HELD)
  # The step reads all it is given but the balance bias [8, 64] twice: routes come with the batch.
  assert f["xla_argument_bytes"] == f["held_bytes"] - 2 * 8 * 64 * 4 == f["held_bytes"] - f["unread_bytes"]
  assert f["rows"] == 4 * 31 * 24 + 1  # 4 facts x 31 answer tokens x K = 24, + padding row
  assert f["temp_bytes"] > 0 and f["output_bytes"] >= 0
  assert f["total_bytes"] == f["held_bytes"] + f["temp_bytes"] + f["output_bytes"]
  assert f["fits"] and f["device_memory_bytes"] == GIB // 2
  assert "stories260K-hf/config.json" in f["backbone_source"]
  assert "data 1 x expert 8 on 8 cpu devices" in out
  assert f"{f['total_bytes']:,}" in out.split("\ntotal")[1].splitlines()[0]
  assert "fits in 0.5 GiB per device: yes" in out


def test_abstract_mesh_when_the_devices_are_too_few():
  # 16 expert shards on the 8 devices of conftest: the held bytes come from an AbstractMesh, the
  # step is not compiled, and the report says so.
  cfg = runs.load_run_config(randomization.DEFAULT_CONFIG, TINY + ["mesh.expert=16"])
  f = dry_run.dry_run(cfg)
  assert f["table_bytes"] == 4096 // 16 * 2 * 64 * 4
  assert f["row_state_bytes"] == _row_state_bytes(4096 // 16, 64)
  assert f["temp_bytes"] is f["total_bytes"] is f["fits"] is f["xla_argument_bytes"] is None
  assert "AbstractMesh" in f["mesh"]
  assert "unknown (nothing compiled)" in dry_run.format_report(f)


def test_backbone_shapes_offline(monkeypatch, tmp_path, stories_dir):
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
  bf16 = {"param_dtype": "bfloat16", "compute_dtype": "bfloat16"}
  # Not downloaded: the preset, said so.
  cfg, source = dry_run.backbone_config(runs.ModelSpec(path="meta-llama/Meta-Llama-3-8B", **bf16))
  assert cfg == config_lib.llama3_8b(**bf16)
  assert "preset lamini_jax.config.llama3_8b()" in source and "not available offline" in source
  # In the hub cache: its config.json, read offline.
  snapshot = tmp_path / "models--someone--tiny" / "snapshots" / "abc123"
  snapshot.mkdir(parents=True)
  (snapshot / "config.json").write_text((stories_dir / "config.json").read_text())
  (tmp_path / "models--someone--tiny" / "refs").mkdir()
  (tmp_path / "models--someone--tiny" / "refs" / "main").write_text("abc123")
  cfg, source = dry_run.backbone_config(runs.ModelSpec(path="someone/tiny"))
  assert (cfg.hidden_size, cfg.num_layers) == (64, 5) and "hub cache" in source
  # Neither: an error naming the field.
  with pytest.raises(FileNotFoundError, match="model.path='someone/else'"):
    dry_run.backbone_config(runs.ModelSpec(path="someone/else"))


def test_lora_runs_have_no_dry_run():
  cfg = runs.load_run_config(randomization.DEFAULT_CONFIG, ["method=lora"])
  with pytest.raises(ValueError, match="method=lora"):
    dry_run.dry_run(cfg)


_PAPER_SCRIPT = """
import json, sys
from lamini_jax import dry_run, runs
f = dry_run.dry_run(runs.load_run_config(sys.argv[1]))
print(json.dumps({k: v for k, v in f.items() if isinstance(v, (int, float, bool, str, type(None)))}))
"""


@pytest.mark.slow
def test_paper_scale_config_fits_and_matches_hand_arithmetic():
  # The whole 32-layer Llama 3 8B phase-2 step, compiled for 8 simulated CPU devices in a fresh
  # process (about a minute here), whose peak memory shows that nothing of size was allocated.
  done = subprocess.run([sys.executable, "-c", _PAPER_SCRIPT, str(PAPER)], capture_output=True,
                        text=True, check=True, cwd=runs.REPO, timeout=600)
  f = json.loads(done.stdout.strip().splitlines()[-1])
  d, f_mlp, v, layers = 4096, 14336, 128256, 32
  per_layer = 2 * d * d + 2 * d * 1024 + 3 * d * f_mlp + 2 * d  # q, o; k, v (8 x 128); MLP; 2 norms
  params = 2 * v * d + layers * per_layer + d  # embedding, lm_head, blocks, final norm
  assert f["parameters"] == params == 8_030_261_248  # Llama 3 8B's published 8.03e9
  assert f["backbone_bytes"] == params * 2  # bfloat16, replicated
  assert f["table_bytes"] == 2**20 * (d + d) * 4 // 8 == 4 * GIB  # down + up, float32, 1/8 of rows
  assert f["row_state_bytes"] == _row_state_bytes(2**20 // 8, d)  # keyed: `up` alone trains
  assert f["router_bytes"] == (d * 8 * 128 + 2 * 8 * 1024 * 64 + 2 * 8 * 1024) * 4
  assert f["xla_argument_bytes"] == f["held_bytes"] - f["unread_bytes"] == f["held_bytes"] - 2 * 8 * 1024 * 4
  assert f["rows"] == 32 * 255 * 32 + 1
  # The step holds at least the float32 logits of its 32 fact rows and 8 anchor rows.
  assert f["temp_bytes"] > (32 + 8) * 256 * v * 4
  assert f["total_bytes"] == f["held_bytes"] + f["temp_bytes"] + f["output_bytes"]
  assert f["fits"] and f["total_bytes"] < 80 * GIB
  assert f["host_peak_rss_bytes"] < 2 * GIB  # the bf16 backbone alone would be 15 GiB
  assert "preset" in f["backbone_source"] and f["platform"] == "cpu"
