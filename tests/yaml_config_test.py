"""Typed YAML configs: overrides, and errors that name the file and field."""

import pytest

from lamini_jax import runs
from lamini_jax.runs import REPO
from lamini_jax import tune
from lamini_jax import yaml_config


def test_default_config_loads_and_overrides_apply():
  cfg = runs.load_run_config(REPO / "configs" / "randomization_cpu.yaml",
                             ["train.optimizer.learning_rate=1e-3", "lora.targets=[q, v]",
                            "data.n_train=17", "train.stop_loss=null"])
  assert cfg.train.optimizer.learning_rate == 1e-3
  assert cfg.lora.targets == ("q", "v") and cfg.data.n_train == 17 and cfg.train.stop_loss is None
  assert yaml_config.from_dict(runs.RunConfig, yaml_config.to_dict(cfg)) == cfg


OVERLAYS = ("tune_cpu.yaml",)  # sections over another config (lamini_jax.tune's over the CPU default)


SHIPPED = sorted(p for p in (REPO / "configs").glob("*.yaml") if p.name not in OVERLAYS)


@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_is_valid(config):
  yaml_config.load(runs.RunConfig, config)


def test_the_tune_overlay_is_valid_over_the_cpu_default():
  cfg = tune.default_config()
  assert str(tune.TUNE_CONFIG).endswith(OVERLAYS[0])
  mome = cfg.mome
  assert (mome.train_slots, mome.train_slot_choice, mome.key_match, mome.anchor.questions) == (
      2, "exclusive_unread", 0.9999, 0)
  # Cosine keys; a keyed row's activation at its own input, threshold * (1 / key_match - 1), is
  # 3x what key_match 0.9 gave at threshold 4.
  assert mome.layer.unit_input is True
  assert mome.layer.threshold * (1 / mome.key_match - 1) == pytest.approx(3 * 4.0 * (1 / 0.9 - 1))
  assert mome.train.optimizer.learning_rate == 1.0 and mome.layers == (4,)


def test_errors_name_the_file_and_field(tmp_path):
  bad = tmp_path / "bad.yaml"
  bad.write_text("train:\n  epochz: 3\n")
  with pytest.raises(yaml_config.ConfigError, match=r"bad.yaml.*train: unknown field 'epochz'"):
    runs.load_run_config(bad)
  bad.write_text("train:\n  epochs: many\n")
  with pytest.raises(yaml_config.ConfigError, match=r"bad.yaml.*train.epochs: expected an integer, got 'many'"):
    runs.load_run_config(bad)
  with pytest.raises(yaml_config.ConfigError, match=r"train: train.batch_size must be positive"):
    runs.load_run_config(None, ["train.batch_size=0"])
  with pytest.raises(yaml_config.ConfigError, match="does not exist"):
    runs.load_run_config(tmp_path / "missing.yaml")


def test_paper_mome_config_has_exactly_the_papers_switches():
  """configs/mome_paper_cpu.yaml: the paper's MoME (issue #17 item 3), every lamini-jax addition off."""
  paper = runs.load_run_config(REPO / "configs" / "mome_paper_cpu.yaml")
  shipped = runs.load_run_config(REPO / "configs" / "randomization_cpu.yaml")
  m = paper.mome
  assert paper.method == "mome"
  assert m.generalization.epochs == 1  # phase 1 on: router and experts on general text, then frozen
  assert m.key_match == 0 and m.layer.threshold == 0  # no keyed experts, no threshold
  assert m.anchor.weight == 0 and m.balance is False and m.margin == 0  # no anchors, balance, hinge
  assert m.train_positions == "all"
  assert m.layer.slots == 32 and m.layer.num_experts == 2**20  # "32 out of ... one million"
  assert m.train.optimizer.decay_steps == 0  # constant learning rate
  # phase 1 reads the dev corpus's articles that dev perplexity does not read
  _, articles = runs.training_corpus(paper, m.generalization.corpus, "mome.generalization.corpus")
  assert articles == "even" and paper.eval.dev_articles == "odd"
  # nothing outside the mome section differs from the shipped CPU config, nor the layer's shape
  for section in ("model", "data", "lora", "train", "eval", "mesh"):
    assert getattr(paper, section) == getattr(shipped, section), section
  for field in ("embed_dim", "expert_rank", "num_heads", "key_dim", "activation"):
    assert getattr(m.layer, field) == getattr(shipped.mome.layer, field), field
  assert m.layers == shipped.mome.layers
