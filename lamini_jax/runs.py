"""The run directory: its layout, its config (`RunConfig`), and loading any model trained in it.

A run directory (`experiments.randomization`, or any memory-tuning job) holds

  config.yaml              the `RunConfig` of the run (`CONFIG_FILE`)
  metrics.jsonl            one line per epoch of every trained label (`METRICS_FILE`)
  checkpoints/<label>/     Orbax checkpoints of one trained model: LoRA adapters or a MoME table
  mome/<label>/            a MoME run's frozen router, balance and collision report
  mome/mome-general/       MoME phase 1's result (`mome.tuning.GENERAL_LABEL`), when it runs
  report.md, summary.json, table1.md, loss_curves.png   the experiment's report

Only this module knows that layout: the library's training functions take the
`train.RunPaths` of one label (`RunDir.paths`), and `load_trained` gives back any
trained model of a run, LoRA or MoME, by label.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from jax.sharding import Mesh
import numpy as np

from lamini_jax.checkpoint import Checkpointer
from lamini_jax.config import ModelConfig
from lamini_jax.data import corpus as corpus_lib
from lamini_jax.data import encoding
from lamini_jax.data import facts as facts_lib
from lamini_jax.data import sources
from lamini_jax import hf
from lamini_jax.lora import LoraConfig
from lamini_jax import lora_tuning
from lamini_jax import sharding
from lamini_jax.model import Transformer
from lamini_jax.mome.config import MomeTuningConfig
from lamini_jax.mome import anchors as anchors_lib
from lamini_jax.mome import tuning as mome_tuning
from lamini_jax import train as train_lib
from lamini_jax import yaml_config

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
MOME_DIR = "mome"
GENERAL_LABEL = mome_tuning.GENERAL_LABEL


# ---------------------------------------------------------------------------------------------
# The run config.


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The backbone: a local Hugging Face directory or a hub id."""

  path: str = "../shared/models/stories260K-hf"
  param_dtype: str = "float32"
  compute_dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """Which facts to memorize and which TruthfulQA questions to hold out: `n_heldout` for each of
  dev and test, drawn by `heldout_seed` alone (`facts.split_questions`), so that no seed's dev
  question is another seed's test question. `seed` draws the trained questions (and the
  anchors') from the rest, and the random answers."""

  dataset: str = "truthfulqa"  # truthfulqa | mmlu | facts (the user's `facts_file`)
  facts_file: str | None = None
  data_dir: str | None = None
  n_train: int = 256
  n_heldout: int = 100  # per split: dev and test each
  seed: int = 0
  heldout_seed: int = 0
  template: str = encoding.PromptTemplate().prompt
  answer_end: str = encoding.PromptTemplate().answer_end
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
    if self.seed < 0 or self.heldout_seed < 0:
      raise ValueError(f"data.seed and data.heldout_seed must be >= 0, got {self.seed} and "
                       f"{self.heldout_seed}")


SPLITS = ("dev", "test")


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  """Held-out evaluation on one split, and how often to check exact-match recall while training.

  `split: dev` for every choice of settings, `test` only for final tables; each has its own
  questions, MMLU subjects, perplexity text and locality prompts (`evaluate.load_heldout`).
  Training (anchors, phase 1) may read only the articles of `dev_corpus` that dev does not
  (`training_corpus`).
  """

  split: str = "dev"
  mmlu_questions: int = 200
  mmlu_k: int = 0
  ppl_windows: int = 32
  ppl_seq_len: int = 128
  dev_corpus: str = "corpus/wikitext-2-valid.txt"
  dev_articles: str = "odd"  # odd | even | all
  corpus: str = "corpus/wikitext-2-test.txt"  # the test split's
  ood_corpus: str = "corpus/tinyshakespeare.txt"  # the test split's out-of-domain text; "" = none
  locality_tokens: int = 32  # greedy tokens compared with the base model's
  locality_prompts: int = 100  # sentence starts of the split's text; 0 = none
  table_rows: int = 6
  answer_tokens: int = 48
  recall_every: int = 5  # epochs; 0 = only at the end
  stop_at_full_recall: bool = True

  def __post_init__(self):
    if self.split not in SPLITS:
      raise ValueError(f"eval.split must be dev or test, got {self.split!r}")
    if self.dev_articles not in corpus_lib.ARTICLES:
      raise ValueError(f"eval.dev_articles must be one of {corpus_lib.ARTICLES}, got "
                       f"{self.dev_articles!r}")
    for name in ("mmlu_questions", "mmlu_k", "ppl_windows", "locality_prompts"):
      if getattr(self, name) < 0:
        raise ValueError(f"eval.{name} must be >= 0, got {getattr(self, name)}")
    for name in ("ppl_seq_len", "locality_tokens"):
      if getattr(self, name) < 1:
        raise ValueError(f"eval.{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class MeshSpec:
  """The device mesh of a run: tokens split over `data`, every expert table's rows over `expert`."""

  data: int = 1
  expert: int = 1

  def __post_init__(self):
    for name in ("data", "expert"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"mesh.{name} must be a positive int, got {getattr(self, name)!r}")

  def build(self) -> Mesh | None:
    """The mesh (None for one device: the library's unsharded path)."""
    if self.data * self.expert == 1:
      return None
    try:
      return sharding.make_mesh(self.data, self.expert)
    except ValueError as e:
      raise ValueError(f"mesh: {e} (on a CPU, simulate devices with XLA_FLAGS="
                       f"--xla_force_host_platform_device_count={self.data * self.expert})") from None


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """One randomization experiment (or one memory-tuning job)."""

  model: ModelSpec = ModelSpec()
  data: DataSpec = DataSpec()
  lora: LoraConfig = LoraConfig()
  train: train_lib.TrainConfig = train_lib.TrainConfig()
  mome: MomeTuningConfig = MomeTuningConfig()
  eval: EvalSpec = EvalSpec()
  mesh: MeshSpec = MeshSpec()
  method: str = "lora"
  answers: tuple[str, ...] = ("real", "random")
  run_dir: str = "runs/randomization"

  def __post_init__(self):
    if self.method not in ("lora", "mome", "both"):
      raise ValueError(f"method must be lora, mome or both, got {self.method!r}")
    bad = [a for a in self.answers if a not in ("real", "random")]
    if bad or not self.answers:
      raise ValueError(f"answers must be a non-empty list of real/random, got {list(self.answers)}")


def load_run_config(path, overrides=()) -> RunConfig:
  return yaml_config.load(RunConfig, path, overrides)


def prompt_template(spec: DataSpec) -> encoding.PromptTemplate:
  return encoding.PromptTemplate(spec.template, spec.answer_end, spec.train_eos)


def resolve_model_path(path: str) -> str:
  """`path` as given, or relative to the repository when run from elsewhere."""
  if pathlib.Path(path).exists() or not (REPO / path).exists():
    return path
  return str(REPO / path)


# ---------------------------------------------------------------------------------------------
# The layout.


@dataclasses.dataclass(frozen=True)
class RunDir:
  """A run directory; every path inside one is built here."""

  path: pathlib.Path

  def __post_init__(self):
    object.__setattr__(self, "path", pathlib.Path(self.path))

  @property
  def config_file(self) -> pathlib.Path:
    return self.path / CONFIG_FILE

  @property
  def metrics_file(self) -> pathlib.Path:
    return self.path / METRICS_FILE

  @property
  def checkpoints_root(self) -> pathlib.Path:
    return self.path / CHECKPOINTS_DIR

  def paths(self, label: str) -> train_lib.RunPaths:
    """Where the model trained under `label` writes."""
    return train_lib.RunPaths(checkpoints=self.checkpoints_root / label, metrics=self.metrics_file,
                              store=self.path / MOME_DIR / label)

  def labels(self) -> list[str]:
    """The trained models of the run (MoME's phase 1 is not one)."""
    root = self.checkpoints_root
    if not root.is_dir():
      return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != GENERAL_LABEL)

  def is_mome(self, label: str) -> bool:
    """Whether `label` is a MoME model (its frozen router is stored beside its checkpoints)."""
    return mome_tuning.is_prepared(self.paths(label).store)

  def has_run(self) -> bool:
    return self.config_file.is_file() and self.checkpoints_root.exists()

  def config(self) -> RunConfig:
    if not self.config_file.is_file():
      raise FileNotFoundError(f"{self.path} is not a run directory: {CONFIG_FILE} is missing")
    return load_run_config(self.config_file)

  def resolve_label(self, label: str | None) -> str:
    """`label`, checked to be a trained model of the run; None picks the only one there is."""
    labels = self.labels()
    if label is None:
      if len(labels) != 1:
        raise FileNotFoundError(f"{self.path} holds {len(labels)} trained models {labels}; choose one"
                                " by label")
      return labels[0]
    if label not in labels:
      raise FileNotFoundError(f"{self.path}: no checkpoint for label {label!r}; available: {labels}")
    return label


def run_dir_of_checkpoint(checkpoint, label: str | None) -> tuple[RunDir, str | None]:
  """(run directory, label) of `RUN_DIR` (+ `label`) or of `RUN_DIR/checkpoints/LABEL`."""
  path = pathlib.Path(checkpoint)
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist")
  if (path / CONFIG_FILE).is_file():
    return RunDir(path), label
  if path.parent.name == CHECKPOINTS_DIR and (path.parent.parent / CONFIG_FILE).is_file():
    if label is not None and label != path.name:
      raise ValueError(f"{path} is label {path.name!r} but the label given is {label!r}")
    return RunDir(path.parent.parent), path.name
  raise FileNotFoundError(f"{path} is neither a run directory (with {CONFIG_FILE}) nor "
                          f"RUN_DIR/{CHECKPOINTS_DIR}/LABEL")


# ---------------------------------------------------------------------------------------------
# Loading what a run trained.


@dataclasses.dataclass(frozen=True)
class Backbone:
  cfg: ModelConfig
  params: Any
  tokenizer: Any
  model_dir: pathlib.Path


def load_backbone(spec: ModelSpec) -> Backbone:
  """The run's frozen backbone: config, parameters, tokenizer and its directory."""
  cfg, params, model_dir = hf.load_pretrained(resolve_model_path(spec.path), spec.param_dtype,
                                              spec.compute_dtype, progress=False)
  return Backbone(cfg, params, hf.load_tokenizer(model_dir), model_dir)


@dataclasses.dataclass(frozen=True)
class Trained:
  """A trained model of a run: `model.apply(variables, tokens)` runs it."""

  run: RunDir
  label: str
  config: RunConfig
  backbone: Backbone
  model: Transformer
  variables: dict[str, Any]
  is_mome: bool

  @property
  def template(self) -> encoding.PromptTemplate:
    return prompt_template(self.config.data)


def load_trained(run_dir, label: str | None = None, backbone: Backbone | None = None) -> Trained:
  """The model trained under `label` (LoRA adapters or a MoME table) in a run directory.

  The run's config is read once; `backbone` (from `load_backbone(config.model)`)
  saves reloading it when several labels of one run are loaded. Only the
  trained variables are read from the checkpoint, never the optimizer state.
  """
  run = RunDir(run_dir)
  config = run.config()
  label = run.resolve_label(label)
  backbone = backbone or load_backbone(config.model)
  paths = run.paths(label)
  if run.is_mome(label):
    model, variables = mome_tuning.load_mome(config.mome, paths, backbone.cfg, backbone.params)
    return Trained(run, label, config, backbone, model, variables, True)
  model = lora_tuning.lora_model(backbone.cfg, config.lora)
  ckpt = Checkpointer(paths.checkpoints, every=0)
  lora = ckpt.restore_trainable(lora_tuning.abstract_lora(model))
  ckpt.close()
  if lora is None:
    raise FileNotFoundError(f"{paths.checkpoints}: no complete checkpoint")
  return Trained(run, label, config, backbone, model, {"params": backbone.params, "lora": lora}, False)


# ---------------------------------------------------------------------------------------------
# The data of a run: facts, held-out questions, phase-1 windows, the anchor pool.


def question_split(spec: DataSpec, n_spare: int | None = 0) -> facts_lib.QuestionSplit:
  """The run's TruthfulQA questions: dev, test, trained (dataset truthfulqa) and `n_spare` spare."""
  items = sources.load_truthfulqa(spec.data_dir)
  n_train = spec.n_train if spec.dataset == "truthfulqa" else 0
  if 2 * spec.n_heldout + n_train > len(items):
    raise ValueError(f"data.n_heldout={spec.n_heldout} (each of dev and test) and data.n_train="
                     f"{n_train} need {2 * spec.n_heldout + n_train} TruthfulQA questions; there are "
                     f"{len(items)}")
  return facts_lib.split_questions(items, spec.n_heldout, n_train, spec.seed, spec.heldout_seed,
                                   n_spare)


def facts_and_heldout(spec: DataSpec, answers: str, split: str = "dev"):
  """(trained facts, held-out TruthfulQA items of `split`, trained MMLU items) for one answer mode."""
  questions = question_split(spec)
  held = questions.heldout(split)
  if spec.dataset == "facts":
    return facts_lib.load_facts_file(spec.facts_file)[:spec.n_train], held, []
  if spec.dataset == "truthfulqa":
    return facts_lib.truthfulqa_facts(questions.train, answers, spec.seed), held, []
  mmlu = sources.load_mmlu(spec.data_dir, split="test")
  trained, _ = facts_lib.split_items(mmlu, spec.n_train, 0, spec.seed)
  return facts_lib.mmlu_facts(trained, answers, spec.seed), held, trained


def spare_truthfulqa(spec: DataSpec, count: int) -> list[sources.TruthfulQAItem]:
  """Up to `count` TruthfulQA items that this run neither trains nor holds out (dev or test)."""
  return question_split(spec, count).spare


def data_file(data_dir: str | None, relative: str, field: str) -> pathlib.Path:
  """A data file named relative to the data directory (unless absolute); an error names `field`."""
  root = sources.resolve_data_dir(data_dir)
  path = pathlib.Path(relative)
  if not path.is_absolute() and root is not None:
    path = root / path
  if not path.is_file():
    raise FileNotFoundError(f"{field}: {path} not found")
  return path


def data_path(cfg: RunConfig, relative: str, field: str) -> pathlib.Path:
  """`data_file` in the run's data directory."""
  return data_file(cfg.data.data_dir, relative, field)


def training_corpus(cfg: RunConfig, relative: str, field: str) -> tuple[pathlib.Path, str]:
  """(path, articles: all | even | odd) of a corpus that training reads (`field`: the anchors,
  phase 1), never text an evaluation reads.

  The evaluation's dev corpus: the articles dev perplexity does not read (`eval.dev_articles`).
  A test corpus (`eval.corpus`, `eval.ood_corpus`) is an error.
  """
  path = data_path(cfg, relative, field)
  e = cfg.eval
  if _same_file(cfg, e.dev_corpus, path):
    if e.dev_articles == "all":
      raise ValueError(f"{field}={relative} is eval.dev_corpus, all of whose articles dev perplexity "
                       "reads (eval.dev_articles=all): set eval.dev_articles to odd or even")
    return path, "even" if e.dev_articles == "odd" else "odd"
  for name in ("corpus", "ood_corpus"):
    if _same_file(cfg, getattr(e, name), path):
      raise ValueError(f"{field}={relative} is eval.{name}, a test corpus: training must not read "
                       "test text; use another corpus (e.g. eval.dev_corpus, split by article)")
  return path, "all"


def _same_file(cfg: RunConfig, relative: str, path: pathlib.Path) -> bool:
  if not relative:
    return False
  try:
    return data_path(cfg, relative, "").resolve() == path.resolve()
  except FileNotFoundError:
    return False


def general_windows(cfg: RunConfig, tokenizer) -> np.ndarray | None:
  """Phase-1 corpus windows of a MoME run (None when phase 1 is off)."""
  g = cfg.mome.generalization
  if not g.epochs:
    return None
  path, articles = training_corpus(cfg, g.corpus, "mome.generalization.corpus")
  with corpus_lib.corpus_file(path, articles) as part:
    return encoding.corpus_windows(tokenizer, part, g.seq_len, g.windows)


def anchor_pool(cfg: RunConfig, tokenizer, template, pad_id: int) -> dict[str, np.ndarray] | None:
  """The phase-2 anchor pool of a MoME run (None when the anchors are off).

  Its corpus windows never come from text an evaluation reads (`training_corpus`) and its
  questions are neither trained nor held out (`spare_truthfulqa`).
  """
  a = cfg.mome.anchor
  if not a.weight:
    return None
  spare = spare_truthfulqa(cfg.data, a.questions) if a.questions else []
  pairs = [(i.question, i.best_answer) for i in spare]
  if not (a.windows and a.corpus):
    return anchors_lib.anchor_sequences(tokenizer, template, a, pairs, None, pad_id=pad_id)
  path, articles = training_corpus(cfg, a.corpus, "mome.anchor.corpus")
  with corpus_lib.corpus_file(path, articles) as corpus:
    return anchors_lib.anchor_sequences(tokenizer, template, a, pairs, corpus, pad_id=pad_id)
