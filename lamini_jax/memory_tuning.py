"""Lamini Memory Tuning with LoRA: configuration and the library entry points.

`RunConfig` describes one memory-tuning run (backbone, facts, LoRA adapters and
their training, the MoME of `lamini_jax.mome_tuning` in its `mome:` section,
evaluation); `configs/*.yaml` hold named presets and any field can be overridden
with `--set a.b=value`. `tune_lora` memorizes encoded facts into LoRA adapters on
a frozen backbone; `load_adapter` gives back a trained model (LoRA or MoME) from
a run directory.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable

import numpy as np

from lamini_jax import data as data_lib
from lamini_jax import evaluate as eval_lib
from lamini_jax import hf
from lamini_jax import mome_tuning
from lamini_jax import train as train_lib
from lamini_jax import yaml_config
from lamini_jax.config import ModelConfig
from lamini_jax.lora import LoraConfig
from lamini_jax.model import Transformer

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILE = "config.yaml"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The backbone: a local Hugging Face directory or a hub id."""

  path: str = "../shared/models/stories260K-hf"
  param_dtype: str = "float32"
  compute_dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """Which facts to memorize and which questions to hold out."""

  dataset: str = "truthfulqa"  # truthfulqa | mmlu | facts (the user's `facts_file`)
  facts_file: str | None = None
  data_dir: str | None = None
  n_train: int = 256
  n_heldout: int = 100
  seed: int = 0
  template: str = data_lib.PromptTemplate().prompt
  answer_end: str = data_lib.PromptTemplate().answer_end
  train_eos: bool = True
  max_len: int = 256

  def __post_init__(self):
    if self.dataset not in ("truthfulqa", "mmlu", "facts"):
      raise ValueError(f"data.dataset must be truthfulqa, mmlu or facts, got {self.dataset!r}")
    if self.dataset == "facts" and not self.facts_file:
      raise ValueError("data.dataset=facts needs data.facts_file (a JSONL or CSV of question/answer)")
    if self.n_train <= 0 or self.n_heldout < 0:
      raise ValueError(f"data.n_train must be > 0 and data.n_heldout >= 0, got "
                       f"{self.n_train} and {self.n_heldout}")


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  """Held-out evaluation, and how often to check exact-match recall while training."""

  mmlu_questions: int = 200
  mmlu_k: int = 0
  ppl_windows: int = 32
  ppl_seq_len: int = 128
  corpus: str = "corpus/wikitext-2-test.txt"
  table_rows: int = 6
  answer_tokens: int = 48
  recall_every: int = 5  # epochs; 0 = only at the end
  stop_at_full_recall: bool = True


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """One randomization experiment (or one memory-tuning job)."""

  model: ModelSpec = ModelSpec()
  data: DataSpec = DataSpec()
  lora: LoraConfig = LoraConfig()
  train: train_lib.TrainConfig = train_lib.TrainConfig()
  mome: mome_tuning.MomeTuningConfig = mome_tuning.MomeTuningConfig()
  eval: EvalSpec = EvalSpec()
  method: str = "lora"
  answers: tuple[str, ...] = ("real", "random")
  run_dir: str = "runs/randomization"

  def __post_init__(self):
    if self.method not in ("lora", "mome", "both"):
      raise ValueError(f"method must be lora, mome or both, got {self.method!r}")
    bad = [a for a in self.answers if a not in ("real", "random")]
    if bad or not self.answers:
      raise ValueError(f"answers must be a non-empty list of real/random, got {list(self.answers)}")


def prompt_template(spec: DataSpec) -> data_lib.PromptTemplate:
  return data_lib.PromptTemplate(spec.template, spec.answer_end, spec.train_eos)


def load_run_config(path, overrides=()) -> RunConfig:
  return yaml_config.load(RunConfig, path, overrides)


def resolve_model_path(path: str) -> str:
  """`path` as given, or relative to the repository when run from elsewhere."""
  if pathlib.Path(path).exists() or not (REPO / path).exists():
    return path
  return str(REPO / path)


def lora_model(cfg: ModelConfig, lora: LoraConfig) -> Transformer:
  return Transformer(cfg, lora=lora)


def tune_lora(cfg: ModelConfig, params: Any, encoded, lora: LoraConfig, train_cfg: train_lib.TrainConfig,
              *, pad_id: int, run_dir=None, label: str = "lora", resume: bool = False,
              progress: bool = True, on_epoch: Callable | None = None,
              stop_after_steps: int | None = None) -> tuple[Transformer, dict[str, Any], train_lib.FitResult]:
  """Memorizes `encoded` facts into LoRA adapters; returns (model, variables, result)."""
  model = lora_model(cfg, lora)
  optimizer = train_cfg.optimizer.build()
  state = train_lib.init_lora_state(model, optimizer, train_cfg.seed)
  step = train_lib.make_lora_step(model, train_cfg.optimizer)
  result = train_lib.fit(step, state, params, encoded, train_cfg, pad_id=pad_id, label=label,
                         run_dir=run_dir, resume=resume, progress=progress, on_epoch=on_epoch,
                         stop_after_steps=stop_after_steps)
  return model, {"params": params, "lora": result.state.trainable}, result


def recall_callback(model: Transformer, variables_of: Callable[[train_lib.TrainState], dict[str, Any]],
                    tokenizer, facts, template, every: int, stop_at_full: bool) -> Callable:
  """An `on_epoch` hook: exact-match recall every `every` epochs; stops at 100%.

  `variables_of(state)` gives the model's variables for a train state.
  """

  def on_epoch(epoch: int, state: train_lib.TrainState, fact_loss: np.ndarray) -> dict[str, Any]:
    del fact_loss
    if every <= 0 or (epoch + 1) % every:
      return {}
    rate = eval_lib.recall(model, variables_of(state), tokenizer, facts, template).rate
    return {"recall": rate, "stop": bool(stop_at_full and rate == 1.0)}

  return on_epoch


def load_adapter(run_dir, label: str | None, cfg: ModelConfig, params: Any):
  """(model, variables) of the adapters (LoRA) or experts (MoME) trained under `label`."""
  from lamini_jax.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  run_dir = pathlib.Path(run_dir)
  config_path = run_dir / CONFIG_FILE
  if not config_path.is_file():
    raise FileNotFoundError(f"{run_dir} is not a run directory: {CONFIG_FILE} is missing")
  run_cfg = load_run_config(config_path)
  ckpt_root = run_dir / "checkpoints"
  labels = sorted(p.name for p in ckpt_root.iterdir()
                  if p.name != mome_tuning.GENERAL_LABEL) if ckpt_root.is_dir() else []
  if label is None and len(labels) == 1:
    label = labels[0]
  if label not in labels:
    raise FileNotFoundError(f"{run_dir}: no checkpoint for adapter {label!r}; available: {labels}")
  if mome_tuning.is_mome_run(run_dir, label):
    return mome_tuning.load_mome(run_dir, label, cfg, params)
  model = lora_model(cfg, run_cfg.lora)
  optimizer = run_cfg.train.optimizer.build()
  like = train_lib.init_lora_state(model, optimizer, run_cfg.train.seed)
  ckpt = Checkpointer(ckpt_root / label, every=0)
  restored = ckpt.restore(like)
  ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"{ckpt_root / label}: no complete checkpoint")
  return model, {"params": params, "lora": restored[0].trainable}


def load_backbone(spec: ModelSpec):
  """(config, params, tokenizer, model directory) of the run's backbone."""
  cfg, params, model_dir = hf.load_pretrained(resolve_model_path(spec.path), spec.param_dtype,
                                              spec.compute_dtype, progress=False)
  return cfg, params, hf.load_tokenizer(model_dir), model_dir


def facts_and_heldout(spec: DataSpec, answers: str):
  """(trained facts, held-out TruthfulQA items, trained MMLU items) for one answer mode."""
  if spec.dataset == "facts":
    facts = data_lib.load_facts_file(spec.facts_file)[:spec.n_train]
    tqa = data_lib.load_truthfulqa(spec.data_dir)
    _, held = data_lib.split_items(tqa, 0, spec.n_heldout, spec.seed)
    return facts, held, []
  if spec.dataset == "truthfulqa":
    items = data_lib.load_truthfulqa(spec.data_dir)
    train_items, held = data_lib.split_items(items, spec.n_train, spec.n_heldout, spec.seed)
    return data_lib.truthfulqa_facts(train_items, answers, spec.seed), held, []
  mmlu = data_lib.load_mmlu(spec.data_dir, split="test")
  trained, _ = data_lib.split_items(mmlu, spec.n_train, 0, spec.seed)
  tqa = data_lib.load_truthfulqa(spec.data_dir)
  _, held = data_lib.split_items(tqa, 0, spec.n_heldout, spec.seed)
  return data_lib.mmlu_facts(trained, answers, spec.seed), held, trained


def spare_truthfulqa(spec: DataSpec, count: int) -> list[data_lib.TruthfulQAItem]:
  """Up to `count` TruthfulQA items that this run neither trains nor holds out."""
  n_train = spec.n_train if spec.dataset == "truthfulqa" else 0
  items = data_lib.load_truthfulqa(spec.data_dir)
  return data_lib.spare_items(items, n_train, spec.n_heldout, spec.seed, count)
