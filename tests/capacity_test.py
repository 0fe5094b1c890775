"""`python -m benchmarks.capacity` without training: its flags, the order of its cells, each cell's
config, the figures it reads from collisions.json, and its rows (appended, resumed, skipped past
--max-seconds) with a fake cell in place of `tune`."""

import json

import pytest

from benchmarks import capacity
from lamini_jax import tune


def _figures(cfg, facts):
  """What `train_cell` returns, made up from the cell's config."""
  return {"recall": 1.0, "recalled": len(facts), "epochs_to_full_recall": 4, "epochs": 4,
          "max_epochs": cfg.mome.train.epochs, "train_seconds": 1.5, "seconds": 2.5,
          "collisions": "balanced", "pair_collisions": 7, "pair_collisions_unbalanced": 9,
          "max_facts_per_expert": 3, "rows_written_per_fact": 20.0, "rows_per_fact": 24.0, "layers": {}}


class FakeCell:
  """Records each call; raises on the call numbered `fail_at` (0-based), like a killed run."""

  def __init__(self, fail_at=None):
    self.calls, self.fail_at = [], fail_at

  def __call__(self, cfg, facts, resume):
    if len(self.calls) == self.fail_at:
      raise KeyboardInterrupt("killed")
    self.calls.append((cfg.mome.layer.num_experts, cfg.data.n_train, len(facts), resume, cfg.run_dir))
    return _figures(cfg, facts)


def _rows(run_dir):
  return [json.loads(line) for line in (run_dir / capacity.ROWS_FILE).read_text().splitlines()]


def test_bad_flags_are_errors_that_name_the_flag_and_value(tmp_path, capsys):
  for flags, message in ((["--experts", "15,x"], "--experts 15,x: 'x' is not an integer"),
                         (["--experts", "65536"], "--experts 65536: 65536 is not log2 of a number"),
                         (["--experts", "16,18,16"], "--experts 16,18,16: 16 is given twice"),
                         (["--facts", "0"], "--facts 0: 0 is not a number of facts >= 1"),
                         (["--facts", "1000,"], "--facts 1000,: '' is not an integer"),
                         (["--seed", "-1"], "--seed must be >= 0, got -1"),
                         (["--max-seconds", "0"], "--max-seconds must be a number of seconds > 0"),
                         (["--set", "mome.layer.num_experts=4096"],
                          "--set mome.layer.num_experts: --experts sets it"),
                         (["--set", "data.n_train=3"], "--set data.n_train: lamini_jax.tune sets it"),
                         (["--set", "mome.layer.top_k=0"], "MomeConfig.top_k=0")):
    assert capacity.main(["--run-dir", str(tmp_path / "run"), *flags]) == 2, flags
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, (flags, err)
  assert not (tmp_path / "run").exists()


def test_cells_run_fewest_facts_first_then_fewest_experts():
  s = capacity.Settings(experts=(20, 16), facts=(4000, 1000, 64000))
  assert [c.key for c in s.cells()] == [(16, 1000), (20, 1000), (16, 4000), (20, 4000), (16, 64000),
                                        (20, 64000)]
  assert s.cells()[1].name == "cell-20-1000" and s.cells()[1].experts == 2**20


def test_each_cell_config_is_the_tune_default_with_its_experts_facts_and_run_dir(tmp_path):
  s = capacity.Settings(experts=(12,), facts=(24,))
  base, given = capacity.build_config(s, tmp_path, overrides=["mome.train.epochs=3"])
  assert "mome.train.epochs" in given
  default = tune.default_config()
  cfg = capacity.cell_config(base, capacity.Cell(12, 24), tmp_path)
  assert cfg.method == "mome" and cfg.mome.train.epochs == 3 and cfg.mome.layer.num_experts == 4096
  assert cfg.mome.layer.top_k == default.mome.layer.top_k and cfg.mome.anchor == default.mome.anchor
  assert cfg.run_dir == str(tmp_path / "cell-12-24") and cfg.data.n_train == 24
  assert cfg.data.facts_file == str((tmp_path / "cell-12-24" / tune.FACTS_FILE).resolve())
  record = capacity.settings_record(s, cfg)
  assert record == capacity.settings_record(s, base)  # the cells' own fields are left out
  assert "num_experts" not in record["config"]["mome"]["layer"] and "run_dir" not in record["config"]


def test_collision_figures_sum_pairs_and_rows_over_layers():
  layer = lambda pairs, most, written, per_fact: {"pair_collisions": pairs, "max_facts_per_expert": most,
                                                  "rows_written": written, "rows_per_fact": per_fact}
  report = {"unbalanced": {"layers_3/mome": layer(50, 9, 100, 30.0),
                           "layers_4/mome": layer(40, 8, 90, 20.0)},
            "balanced": {"layers_3/mome": layer(5, 3, 150, 30.0),
                         "layers_4/mome": layer(4, 2, 170, 22.0)}}
  got = capacity.collision_figures(report, 10)
  assert got["collisions"] == "balanced" and got["layers"] == report["balanced"]
  assert got["pair_collisions"] == 9 and got["pair_collisions_unbalanced"] == 90
  assert got["max_facts_per_expert"] == 3
  assert got["rows_written_per_fact"] == 32.0 and got["rows_per_fact"] == 26.0
  plain = capacity.collision_figures({"unbalanced": report["unbalanced"]}, 10)
  assert plain["collisions"] == "unbalanced" and plain["pair_collisions"] == 90


def test_rows_are_appended_per_cell_and_resume_runs_only_the_cells_not_done(tmp_path, capsys):
  s = capacity.Settings(experts=(10, 12), facts=(6, 12))
  base, _ = capacity.build_config(s, tmp_path)
  run_dir = tmp_path / "bench"
  killed = FakeCell(fail_at=2)
  with pytest.raises(KeyboardInterrupt):
    capacity.run(s, base, run_dir, killed)
  assert [(c[0], c[1], c[2], c[3]) for c in killed.calls] == [(1024, 6, 6, False), (4096, 6, 6, False)]
  assert killed.calls[1][4] == str(run_dir / "cell-12-6")
  rows = _rows(run_dir)
  assert [(r["log2_experts"], r["facts"]) for r in rows] == [(10, 6), (12, 6)]
  assert all(r["peak_rss_mib"] > 0 and r["seed"] == 0 and r["recall"] == 1.0 for r in rows)
  with open(run_dir / capacity.ROWS_FILE, "a") as f:
    f.write('{"cell": "cell-10-12", "log2_')  # a row cut short by the kill
  (run_dir / "cell-10-12").mkdir()  # the cell the kill cut short

  with pytest.raises(ValueError, match="holds a benchmark .*pass --resume"):
    capacity.run(s, base, run_dir, FakeCell())
  with pytest.raises(ValueError, match="--resume: .* differs in seed: 0 there, 1 now"):
    capacity.run(capacity.Settings(experts=(10, 12), facts=(6, 12), seed=1), base, run_dir, FakeCell(),
                 resume=True)
  capsys.readouterr()
  resumed = FakeCell()
  out = capacity.run(s, base, run_dir, resumed, resume=True)
  assert [(c[0], c[1], c[3]) for c in resumed.calls] == [(1024, 12, True), (4096, 12, True)]
  assert "cell-10-6: done in an earlier run" in capsys.readouterr().out
  every = [(10, 6), (12, 6), (10, 12), (12, 12)]
  assert [(r["log2_experts"], r["facts"]) for r in _rows(run_dir)] == every  # the cut row dropped
  assert [(r["log2_experts"], r["facts"]) for r in out] == every
  table = capacity.markdown_table(out).splitlines()
  assert len(table) == 2 + 4 and table[2].startswith("| 2^10 | 6 | 1.0000 | 4 | 4/")


def test_past_max_seconds_the_running_cell_finishes_and_later_cells_are_skipped(tmp_path, capsys):
  s = capacity.Settings(experts=(10, 12), facts=(6,), max_seconds=100.0)
  base, _ = capacity.build_config(s, tmp_path)
  times = iter([0.0, 50.0, 150.0])  # the start; before cell 1 (50 s in); before cell 2 (150 s in)
  cell = FakeCell()
  out = capacity.run(s, base, tmp_path / "bench", cell, clock=lambda: next(times))
  assert [c[0] for c in cell.calls] == [1024]
  assert [r.get("skipped", False) for r in out] == [False, True]
  assert "cell-12-6: skipped, --max-seconds 100 passed (150 s so far)" in capsys.readouterr().out
  assert len(_rows(tmp_path / "bench")) == 1
  last = capacity.markdown_table(out).splitlines()[-1]
  assert last.startswith("| 2^12 | 6 | skipped (--max-seconds) | - |")
