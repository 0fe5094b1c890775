"""Reports: the mean, standard error and paired differences over seeds against float64 numpy."""

import math

import numpy as np
import pytest

from lamini_jax import report


def _se64(x):
  """sqrt(sum((x - mean)^2) / (n - 1)) / sqrt(n), written out in float64."""
  x = np.asarray(x, np.float64)
  return math.sqrt(float(np.sum((x - x.sum() / x.size) ** 2)) / (x.size - 1)) / math.sqrt(x.size)


def test_mean_se_against_float64():
  # Values whose float32 mean and spread lose digits: 1e8 + small offsets.
  x = [1e8 + 0.1, 1e8 + 0.4, 1e8 + 0.2, 1e8 + 0.7]
  mean, se = report.mean_se(x)
  assert mean == np.mean(np.asarray(x, np.float64))
  assert se == pytest.approx(_se64(x), rel=1e-12)
  assert se == pytest.approx(np.std(x, ddof=1) / 2, rel=1e-12) and se > 0.1
  assert np.float32(np.std(np.asarray(x, np.float32), ddof=1)) != pytest.approx(se * 2, rel=1e-3)
  one = report.mean_se([3.5])
  assert one[0] == 3.5 and math.isnan(one[1])
  with pytest.raises(ValueError, match="non-empty"):
    report.mean_se([])


def test_aggregate_seeds_paired_differences():
  rng = np.random.default_rng(7)
  base_ppl = rng.uniform(200, 240, size=5)
  per_seed = []
  for k in range(5):
    per_seed.append({
        "base": {"perplexity": float(base_ppl[k]), "mc1": 0.21, "mmlu_scored": 170},
        "mome-random": {"perplexity": float(base_ppl[k] - 3 + 0.5 * k), "mc1": 0.2 + 0.01 * k,
                        "mmlu_scored": 170, "recall": 1.0, "epochs_to_full_recall": [6, None][k % 2],
                        "collisions": {"layer 4": {"pairs": 3}}, "converged": True},
    })
  agg = report.aggregate_seeds(per_seed)
  assert set(agg) == {"base", "mome-random"}
  mome = agg["mome-random"]
  values = np.array([s["mome-random"]["perplexity"] for s in per_seed], np.float64)
  diff = values - base_ppl
  assert mome["perplexity"]["values"] == values.tolist()
  assert mome["perplexity"]["mean"] == pytest.approx(values.mean(), rel=1e-15)
  assert mome["perplexity"]["se"] == pytest.approx(_se64(values), rel=1e-12)
  assert mome["perplexity"]["diff_mean"] == pytest.approx(diff.mean(), rel=1e-12)
  assert mome["perplexity"]["diff_se"] == pytest.approx(_se64(diff), rel=1e-12)
  # The paired SE (0.5 k steps) is far below the unpaired one (the base model's spread).
  assert mome["perplexity"]["diff_se"] < 0.5 * mome["perplexity"]["se"]
  assert mome["mc1"]["diff_mean"] == pytest.approx(np.mean([0.01 * k - 0.01 for k in range(5)]))
  assert agg["base"]["mc1"] == {"values": [0.21] * 5, "mean": pytest.approx(0.21),
                                "se": pytest.approx(0.0, abs=1e-15)}
  assert "diff_mean" not in agg["base"]["perplexity"]  # base against itself is not reported
  assert "diff_mean" not in mome["recall"]  # the base model has no recall
  assert mome["epochs_to_full_recall"] == {"values": [6, None, 6, None, 6], "mean": None, "se": None}
  assert "collisions" not in mome and "converged" not in mome  # not numbers
  with pytest.raises(ValueError, match="seed 1 has models"):
    report.aggregate_seeds([{"base": {}, "a": {}}, {"base": {}}])


def test_seeds_tables_name_the_split():
  per_seed = [{"base": {"perplexity": 10.0 + k, "locality_exact": 1.0},
               "lora-real": {"perplexity": 12.0 + 2 * k, "locality_exact": 0.5 + 0.1 * k}}
              for k in range(3)]
  agg = report.aggregate_seeds(per_seed)
  table = report.seeds_table(agg, "test")
  assert "| test perplexity | 11.0000 ± 0.5774 | 14.0000 ± 1.1547 |" in table
  diff = report.seeds_table(agg, "test", diff=True)
  assert diff.splitlines()[0] == "| | lora-real |"
  assert "| test perplexity | 3.0000 ± 0.5774 |" in diff
  assert "| test locality_exact | -0.4000 ± 0.0577 |" in diff
  md = report.seeds_markdown({"seeds": [0, 1, 2], "split": "test", "runs": ["seed-0", "seed-1", "seed-2"],
                              "sources": {"perplexity": "32 windows of corpus/wikitext-2-test.txt"},
                              "models": agg})
  assert "**test** split" in md and "[seed-2](seed-2/report.md)" in md
  assert "- `perplexity`: 32 windows of corpus/wikitext-2-test.txt" in md


def test_the_differences_figure_draws_each_paired_difference_with_two_se():
  rng = np.random.default_rng(3)
  per_seed = [{"base": {"perplexity": 200.0 + k, "mc1": 0.21, "mmlu_acc": 0.28},
               "lora-random": {"perplexity": float(3e4 * (1 + rng.uniform())), "mc1": 0.2 + 0.01 * k},
               "mome-random": {"perplexity": 198.0 + 2 * k, "mc1": 0.21, "mmlu_acc": 0.3}}
              for k in range(3)]
  agg = report.aggregate_seeds(per_seed)
  fig = report.plot_seed_differences(agg, "test")
  panels = [ax for ax in fig.axes if ax.get_visible()]
  assert [ax.get_title() for ax in panels] == ["test perplexity", "test mc1", "test mmlu_acc"]
  for ax, key in zip(panels, ("perplexity", "mc1", "mmlu_acc")):
    points = ax.lines[0]
    for m, x in zip(("lora-random", "mome-random"), points.get_xdata()):
      want = agg[m].get(key, {}).get("diff_mean")
      assert (math.isnan(x) if want is None else x == pytest.approx(want, rel=1e-12))
    # The horizontal bar of each model spans mean +- 2 SE (matplotlib's error bar segments).
    segments = ax.collections[0].get_segments()
    for m, seg in zip(("lora-random", "mome-random"), segments):
      e = agg[m].get(key, {})
      if e.get("diff_mean") is not None:
        assert seg[0][0] == pytest.approx(e["diff_mean"] - 2 * e["diff_se"], rel=1e-9, abs=1e-12)
        assert seg[1][0] == pytest.approx(e["diff_mean"] + 2 * e["diff_se"], rel=1e-9, abs=1e-12)
  assert panels[0].get_xscale() == "symlog" and panels[1].get_xscale() == "linear"
  # (198 + 2k) - (200 + k) seed by seed: the paired difference, not a difference of means.
  assert agg["mome-random"]["perplexity"]["diff_mean"] == pytest.approx(-1.0)
  with pytest.raises(ValueError, match="no figure has a paired difference"):
    report.plot_seed_differences(report.aggregate_seeds([{"base": {"mc1": 0.2}}] * 2), "dev")
