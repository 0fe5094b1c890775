"""MoME configuration: the layer (`MomeConfig`) and the memory-tuning run (`MomeTuningConfig`).

`MomeConfig` describes one MoME layer: E rank-R experts, an A-head product-key
router selecting M experts per head (K = A * M slots per token), the activation
and its threshold. `MomeTuningConfig` is the `mome:` section of a run config: it
holds one `MomeConfig` (`layer`, put at each of `layers`) and the settings of
both training phases (`GeneralizationConfig`, phase 2's `train`), the anchors
(`AnchorConfig`), collision mitigation and keyed experts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable

import jax

from lamini_jax import train as train_lib
from lamini_jax_kernels import dispatch
from lamini_jax import yaml_config


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "identity": lambda x: x,
}


def _square_split(n: int) -> tuple[int, int]:
  n1 = math.isqrt(n)
  while n % n1:
    n1 -= 1
  return n1, n // n1


@dataclasses.dataclass(frozen=True)
class MomeConfig:
  """One MoME layer.

  sub_keys: (n1, n2) with n1 * n2 = num_experts; None picks the most square
  split and requires n2 <= 4 * n1 (a perfect square or a power of two works).
  threshold: a constant subtracted before the activation; with "relu" an expert
  is silent unless down^T x exceeds it (`key_rows` makes experts that fire only
  near the inputs they were keyed to).
  unit_input: the experts' down projection sees x / |x| instead of x (the router still
  sees x). A keyed expert then tests the cosine between x and its key; keyed to one position
  it fires at most as hard as at that position's input (docs/tried.md, "Cosine keys").
  """
  num_experts: int = 1024  # E
  embed_dim: int | None = None  # D; None: the backbone's width (see MomeTuningConfig.layer_config)
  expert_rank: int = 1  # R
  num_heads: int = 4  # A router heads
  key_dim: int = 32  # Q, even
  top_k: int = 8  # M experts per router head
  activation: str = "gelu"
  sub_keys: tuple[int, int] | None = None
  threshold: float = 0.0
  unit_input: bool = False

  def __post_init__(self):
    for field in ("num_experts", "embed_dim", "expert_rank", "num_heads", "key_dim", "top_k"):
      value = getattr(self, field)
      if not (value is None and field == "embed_dim") and (not isinstance(value, int) or value < 1):
        raise ValueError(f"MomeConfig.{field}={value!r} must be a positive int")
    if self.key_dim % 2:
      raise ValueError(f"MomeConfig.key_dim={self.key_dim} must be even (two product-key halves)")
    if self.top_k > self.num_experts:
      raise ValueError(f"MomeConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"MomeConfig.activation={self.activation!r} is not one of {sorted(ACTIVATIONS)}")
    if not (isinstance(self.threshold, (int, float)) and 0 <= self.threshold < math.inf):
      raise ValueError(f"MomeConfig.threshold={self.threshold!r} must be a finite number >= 0")
    if not isinstance(self.unit_input, bool):
      raise ValueError(f"MomeConfig.unit_input={self.unit_input!r} must be true or false")
    if self.sub_keys is not None:
      object.__setattr__(self, "sub_keys", tuple(self.sub_keys))
      n1, n2 = self.sub_keys if len(self.sub_keys) == 2 else (0, 0)
      if n1 < 1 or n2 < 1 or n1 * n2 != self.num_experts:
        raise ValueError(
            f"MomeConfig.sub_keys={self.sub_keys} must be positive with n1 * n2 ="
            f" num_experts={self.num_experts}")
    else:
      n1, n2 = _square_split(self.num_experts)
      if n2 > 4 * n1:
        raise ValueError(
            f"MomeConfig.num_experts={self.num_experts} only splits as {n1} x {n2} into"
            " product-key halves; use a perfect square or a power of two (e.g."
            f" {4 ** round(math.log(self.num_experts, 4))}), or set sub_keys=(n1, n2)")

  @property
  def grid(self) -> tuple[int, int]:
    """(n1, n2): sub-keys per product-key half."""
    return self.sub_keys if self.sub_keys is not None else _square_split(self.num_experts)

  @property
  def slots(self) -> int:
    """K = A * M: num_heads * top_k expert slots per token."""
    return self.num_heads * self.top_k

  @property
  def act(self) -> Callable[[jax.Array], jax.Array]:
    """The activation of the pre-activation down^T x, threshold included."""
    return _shifted(self.activation, float(self.threshold))


@functools.lru_cache(maxsize=None)  # one function per (name, threshold): stable under jit caches
def _shifted(activation: str, threshold: float) -> Callable[[jax.Array], jax.Array]:
  act = ACTIVATIONS[activation]
  return act if threshold == 0 else lambda z: act(z - threshold)


_PHASE1_OPTIMIZER = train_lib.OptimizerConfig(learning_rate=1e-3, multiply_by_parameter_scale=False)


@dataclasses.dataclass(frozen=True)
class GeneralizationConfig:
  """Phase 1: router and experts on general text. `epochs = 0` skips it.

  `corpus` is a text file, relative to the data directory unless absolute; it is
  cut into `windows` windows of `seq_len` tokens (`data.encoding.corpus_windows`).
  The router gets a dense update from `router_optimizer`, the table per-row
  sparse updates from `expert_optimizer`.
  """

  epochs: int = 1
  corpus: str = "corpus/wikitext-2-valid.txt"
  windows: int = 256
  seq_len: int = 128
  batch_size: int = 32
  router_optimizer: train_lib.OptimizerConfig = _PHASE1_OPTIMIZER
  expert_optimizer: train_lib.OptimizerConfig = _PHASE1_OPTIMIZER

  def __post_init__(self):
    for name in ("windows", "seq_len", "batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"mome.generalization.{name} must be >= 1, got {getattr(self, name)}")
    if self.epochs < 0:
      raise ValueError(f"mome.generalization.epochs must be >= 0 (0 skips phase 1), got {self.epochs}")


@dataclasses.dataclass(frozen=True)
class AnchorConfig:
  """Phase-2 anchors: text on which the MoME layers must stay silent. `weight = 0`: off.

  Each phase-2 step runs `batch_size` anchor sequences beside the facts and adds
  `weight` x the mean over their tokens of each MoME layer's squared output
  norm to the loss. The backbone is frozen and every MoME layer a residual
  branch, so a zero output on a text is the base model's behaviour on it: the
  penalty teaches a trained expert to answer its fact's positions and stay
  near zero on other text that selects it too (no expert gets trained by the
  anchors alone: they have no answer positions). Sources, cut or padded to
  `seq_len` tokens: `windows` windows of the `corpus` text file (relative to
  the data directory unless absolute; "" for none; of the dev corpus only the
  articles dev perplexity does not read, and never a test corpus:
  `runs.training_corpus`) and `questions` TruthfulQA questions with their best
  answers in the prompt template, taken from those neither trained nor in the
  dev or test split (`runs.spare_truthfulqa`).
  """

  weight: float = 0.0
  batch_size: int = 16
  seq_len: int = 64
  corpus: str = "corpus/wikitext-2-valid.txt"
  windows: int = 256
  questions: int = 256

  def __post_init__(self):
    if self.weight < 0:
      raise ValueError(f"mome.anchor.weight must be >= 0, got {self.weight}")
    for name in ("batch_size", "seq_len"):
      if getattr(self, name) < 1:
        raise ValueError(f"mome.anchor.{name} must be >= 1, got {getattr(self, name)}")
    for name in ("windows", "questions"):
      if getattr(self, name) < 0:
        raise ValueError(f"mome.anchor.{name} must be >= 0, got {getattr(self, name)}")
    if self.weight and not (self.windows and self.corpus) and not self.questions:
      raise ValueError("mome.anchor.weight > 0 needs anchor text: mome.anchor.windows with a"
                       " corpus, or mome.anchor.questions")


TRAIN_POSITIONS = ("answer", "all")
TRAIN_SLOT_CHOICES = ("first", "exclusive", "exclusive_unread")


_DEFAULT_TRAIN = train_lib.TrainConfig(
    epochs=20, batch_size=32, seq_len=192, checkpoint_every=50,
    optimizer=train_lib.OptimizerConfig(learning_rate=0.1, multiply_by_parameter_scale=False))


@dataclasses.dataclass(frozen=True)
class MomeTuningConfig:
  """The `mome:` section of a run: MoME layers, both phases, collision mitigation.

  `layer` is the MoME layer (`MomeConfig`) put at each of `layers`; its
  `embed_dim` is the backbone's width (left unset here, or equal to it).
  With several layers, a later layer's router sees the
  output of the earlier MoME layers, so in phase 2 only the first layer's
  selection is fixed exactly; later layers' inputs move as the earlier
  experts train (their router weights stay frozen).
  `balance` turns on `balance_router` before phase 2 (collision
  mitigation); `whiten`, before it, multiplies each layer's frozen query projection
  by the inverse square root of its inputs' second moment over the facts' answer
  positions (`router.whitened`), so near inputs share fewer experts. `margin` adds
  `decision_hinge` to the phase-2 loss (0: cross-entropy only). `train` is phase 2: its
  optimizer is applied per expert row (keep Adafactor's `multiply_by_parameter_scale` off,
  since `up` starts at 0).
  `recall_every`: epochs between exact-match recall checks in experiments.
  `train_positions`: "answer" (phase 2 trains only the experts selected at the
  positions that predict a trained token, `answer_positions`; the experts of
  prompt tokens, which general text selects too, stay as they were) or "all".
  `anchor`: the phase-2 penalty that keeps the MoME silent on other text.
  `kernel`: the gather-and-apply implementation every phase, evaluation and
  loading use (`lamini_jax_kernels.dispatch.IMPLS`; "auto" picks one for the
  backend and logs which and why).
  `key_match` (0: off; needs `threshold` > 0): before phase 2, the experts of
  the facts' answer positions are keyed to them (`key_rows`), so that an
  expert fires only on inputs that project onto its facts' mean input at
  least `key_match` of its length; other text that selects it leaves it silent.
  `train_slots` (None: all K): how many of the K experts selected at an
  answer position are written (keyed and trained): the first `train_slots`
  slots, i.e. head 0's best experts first. The others keep up = 0 (and, keyed,
  down = 0), so they add nothing; a fact then costs the table about
  train_slots rows per answer token instead of K.
  `train_slot_choice`: which `train_slots` slots: "first" (head 0's best first) or
  "exclusive" (chosen once before phase 2, `collisions.exclusive_slots`: answer
  positions in order each take their best-weighted slots whose expert no earlier
  position writes, else the least-written; so no two positions, of one fact or of
  two, write one expert while another is free) or "exclusive_unread" (the same,
  preferring experts no other answer position selects over weight). One MoME
  layer only (docs/tried.md: fewer rows a fact).
  `repair_epochs` (0: off): `lamini_jax.tune` only: when phase 2 ends with facts
  not recalled exactly, the rows they write retrain from a fresh optimizer state
  for at most this many epochs (`edit.repair`).
  """

  layers: tuple[int, ...] = (3, 4)
  layer: MomeConfig = MomeConfig(num_experts=2**18, num_heads=8, top_k=2)
  key_match: float = 0.0
  balance: bool = True
  whiten: bool = False
  balance_rounds: int = 30
  balance_rate: float = 0.15
  margin: float = 1.0
  recall_every: int = 2
  repair_epochs: int = 0
  train_positions: str = "answer"
  train_slots: int | None = None
  train_slot_choice: str = "first"
  kernel: str = "auto"
  seed: int = 0
  generalization: GeneralizationConfig = GeneralizationConfig()
  anchor: AnchorConfig = AnchorConfig()
  train: train_lib.TrainConfig = _DEFAULT_TRAIN

  def __post_init__(self):
    object.__setattr__(self, "layers", tuple(self.layers))
    if not self.layers or len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
      raise ValueError(f"mome.layers must be distinct non-negative layer indices, got {list(self.layers)}")
    if self.margin < 0 or self.recall_every < 0 or self.repair_epochs < 0:
      raise ValueError(f"mome.margin={self.margin}, mome.recall_every={self.recall_every} and "
                       f"mome.repair_epochs={self.repair_epochs} must be >= 0")
    for name in ("balance", "whiten"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"mome.{name}={getattr(self, name)!r} must be true or false")
    if self.balance_rounds < 0 or self.balance_rate < 0:
      raise ValueError(f"mome.balance_rounds={self.balance_rounds} and mome.balance_rate="
                       f"{self.balance_rate} must be >= 0")
    if self.kernel not in dispatch.IMPLS:
      raise ValueError(f"mome.kernel must be one of {list(dispatch.IMPLS)}, got {self.kernel!r}")
    if self.train_positions not in TRAIN_POSITIONS:
      raise ValueError(f"mome.train_positions must be one of {list(TRAIN_POSITIONS)}, got"
                       f" {self.train_positions!r}")
    if self.train_slots is not None and not 1 <= self.train_slots <= self.layer.slots:
      raise ValueError(f"mome.train_slots={self.train_slots} must be in 1..{self.layer.slots} (the"
                       " layer's num_heads * top_k slots), or null for all")
    if self.train_slots is not None and self.train_positions != "answer":
      raise ValueError("mome.train_slots needs mome.train_positions='answer' (it picks slots of the"
                       f" answer positions), got {self.train_positions!r}")
    if self.train_slot_choice not in TRAIN_SLOT_CHOICES:
      raise ValueError(f"mome.train_slot_choice must be one of {list(TRAIN_SLOT_CHOICES)}, got"
                       f" {self.train_slot_choice!r}")
    if self.train_slot_choice != "first" and (self.train_slots is None or len(self.layers) != 1):
      raise ValueError(f"mome.train_slot_choice={self.train_slot_choice!r} needs mome.train_slots set"
                       f" (got {self.train_slots}) and one MoME layer (got mome.layers="
                       f"{list(self.layers)}): the slots are chosen on the first layer's routes")
    if self.key_match and not (0 < self.key_match < 1 and self.layer.threshold > 0):
      raise ValueError(f"mome.key_match={self.key_match} must be in (0, 1) with mome.layer.threshold > 0"
                       f" (got threshold={self.layer.threshold}); 0 turns keying off")

  def layer_config(self, embed_dim: int) -> MomeConfig:
    """`layer` at the backbone's width; an `embed_dim` set to another width is an error."""
    if self.layer.embed_dim not in (None, embed_dim):
      raise ValueError(f"mome.layer.embed_dim={self.layer.embed_dim} differs from the backbone's"
                       f" hidden size {embed_dim}; leave it unset")
    return dataclasses.replace(self.layer, embed_dim=embed_dim)

  def phase1_key(self) -> str:
    """What the phase-1 result depends on (its cache is reused only when this matches)."""
    fields = ("layers", "layer", "seed", "generalization")
    return json.dumps({k: yaml_config.to_dict(getattr(self, k)) for k in fields}, sort_keys=True)
