"""Facts that arrive in batches: MoME `add` beside LoRA continued and LoRA retrained (issue 18).

    python -m experiments.sequential                          # 2,000 synthetic facts in 20 batches
    python -m experiments.sequential --facts mmlu --n-facts 200 --batches 10 --methods mome
    python -m experiments.sequential --run-dir runs/sequential --resume   # after a kill

mome (`lamini_jax.tune`, then `mome.edit.add`), lora-continued (the adapters trained on each new
batch) and lora-retrained (new adapters on every fact so far) memorize batches as they arrive; after
each: exact recall of the facts so far, of the newest batch, of never-trained paraphrases, held-out
figures, seconds. Then facts are forgotten and updated and all is measured again (docs/sequential.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np

from lamini_jax import checkpoint
from lamini_jax.data import encoding
from lamini_jax.data import facts as facts_lib
from lamini_jax.data import sources
from lamini_jax.data import synthetic
from lamini_jax import evaluate as eval_lib
from lamini_jax import facts as facts_cli
from lamini_jax import lora_tuning
from lamini_jax import model as model_lib
from lamini_jax.mome import edit as edit_lib
from lamini_jax.mome import edit_checks
from lamini_jax.mome import registry
from lamini_jax import recall as recall_lib
from lamini_jax import runs
from lamini_jax import train as train_lib
from lamini_jax import tune
from lamini_jax import yaml_config

try:
  from matplotlib.figure import Figure
except ImportError:  # the plot is skipped, with a note
  Figure = None

METHODS = ("mome", "lora-continued", "lora-retrained")
SOURCES = ("synthetic", "mmlu")
ROWS_FILE, SUMMARY_FILE, PLOT_FILE = "sequential.jsonl", "summary.json", "sequential.png"
SETTINGS_FILE, FACTS_FILE = "sequential.json", "facts.jsonl"
DEFAULTS = {"eval": {"mmlu_questions": 0, "ppl_windows": 8, "locality_prompts": 0}}  # unless set
MMLU_MAX_QUESTION_CHARS = 160  # longer MMLU questions are skipped: they would widen every batch
_EDIT_STREAM, _MMLU_STREAM = 7, 8  # first words of seed sequences (data.facts: 1-5, synthetic: 6)
PLOTTED = {"recall_all": "exact recall of all facts so far", "seconds": "seconds for the batch",
           "answer_loss": "held-out answer loss (TruthfulQA)", "perplexity": "held-out perplexity"}


@dataclasses.dataclass(frozen=True)
class Settings:
  """The experiment's own choices; training settings are the run config's."""

  facts: str = "synthetic"
  n_facts: int = 2000
  batches: int = 20
  methods: tuple[str, ...] = METHODS
  retrain_every: int = 5
  edit_fraction: float = 0.1
  dev_questions: int = 50
  seed: int = 0
  model: str = "../shared/models/stories260K-hf"

  def __post_init__(self):
    if self.facts not in SOURCES:
      raise ValueError(f"--facts must be one of {', '.join(SOURCES)}, got {self.facts!r}")
    if not self.methods or len(set(self.methods)) < len(self.methods) or set(self.methods) - {*METHODS}:
      raise ValueError(f"--methods must be distinct names among {','.join(METHODS)}, got "
                       f"{','.join(self.methods)!r}")
    for name, low, high in (("n_facts", 1, None), ("batches", 1, self.n_facts), ("seed", 0, None),
                            ("retrain_every", 1, None), ("dev_questions", 0, None),
                            ("edit_fraction", 0, 0.5)):
      if not low <= getattr(self, name) <= (high or float("inf")):
        raise ValueError(f"--{name.replace('_', '-')} must be in [{low}, {high or 'inf'}], got "
                         f"{getattr(self, name)}")

  def retrained_after(self) -> list[int]:
    """The batches (1-based) after which lora-retrained trains."""
    return [b for b in range(1, self.batches + 1) if b % self.retrain_every == 0 or b == self.batches]

  def ends(self) -> np.ndarray:
    """Where each batch of facts starts, then the end: sizes that differ by at most one."""
    return np.linspace(0, self.n_facts, self.batches + 1).round().astype(int)


@dataclasses.dataclass(frozen=True)
class Item:
  """A fact, its paraphrase (None for MMLU) and the answer an update gives it (`asked` builds each)."""

  fact: facts_lib.Fact
  paraphrase: str | None
  alternative: str

  def asked(self, paraphrased: bool = False, updated: bool = False) -> facts_lib.Fact:
    return facts_lib.Fact(self.paraphrase if paraphrased else self.fact.question,
                          self.alternative if updated else self.fact.answer, self.fact.fact_id)


def load_items(s: Settings, data_dir: str | None) -> tuple[list[Item], list[sources.MMLUItem]]:
  """(the facts in order of arrival, the MMLU items among them: kept out of held-out MMLU)."""
  if s.facts == "synthetic":
    made = synthetic.synthetic_facts(s.n_facts, s.seed)
    return [Item(f.fact, f.paraphrase, f.alternative) for f in made], []
  pool = sources.load_mmlu(data_dir, split="test")
  kept, wrong_answers, seen = [], [], set()
  for item in (pool[k] for k in np.random.default_rng([_MMLU_STREAM, s.seed]).permutation(len(pool))):
    answer = item.choices[item.answer].strip()
    wrong = [c.strip() for c in item.choices if c.strip() not in ("", answer) and "\n" not in c]
    if len(kept) < s.n_facts and wrong and answer and "\n" not in answer and item.question not in seen \
        and len(item.question) <= MMLU_MAX_QUESTION_CHARS:
      seen.add(item.question)
      kept.append(item)
      wrong_answers.append(wrong[0])
  if len(kept) < s.n_facts:
    raise ValueError(f"--n-facts={s.n_facts}: only {len(kept)} MMLU test questions have at most "
                     f"{MMLU_MAX_QUESTION_CHARS} characters, a one-line answer and no repeat")
  facts = facts_lib.mmlu_facts(kept, "real", s.seed)
  return [Item(f, None, a) for f, a in zip(facts, wrong_answers)], kept


def build_config(s: Settings, run_dir, config=None, overrides: Sequence[str] = ()):
  """(config, fields set): `tune.build_config` of the first batch's MoME run, `DEFAULTS` unless set."""
  run_dir = pathlib.Path(run_dir)
  cfg, given = tune.build_config(s.model, run_dir / FACTS_FILE, int(s.ends()[1]),
                                 "mome", run_dir / "mome", config, overrides)
  values = {sec: {k: v for k, v in fields.items() if f"{sec}.{k}" not in given}
            for sec, fields in DEFAULTS.items()}
  return yaml_config.from_dict(runs.RunConfig, values, "sequential.DEFAULTS", base=cfg), given


@dataclasses.dataclass(frozen=True)
class Context:
  """What every method shares, and the measurement of each."""

  cfg: runs.RunConfig
  given: frozenset[str]
  backbone: runs.Backbone
  template: encoding.PromptTemplate
  heldout: eval_lib.HeldOut
  run_dir: pathlib.Path
  batches: int
  progress: bool

  def measure(self, learner, groups: dict[str, list[facts_lib.Fact]]) -> dict[str, Any]:
    """Exact recall of each group of facts (None for an empty one) and the held-out figures."""
    model, variables = learner.model_variables()
    tok, facts = self.backbone.tokenizer, [f for g in groups.values() for f in g]
    exact = recall_lib.FactRecall(model, tok, facts, self.template)(variables)
    ends = np.cumsum([0] + [len(g) for g in groups.values()])
    out = {k: float(np.mean(exact[a:b])) if b > a else None for k, a, b in zip(groups, ends, ends[1:])}
    return {**out, "heldout": eval_lib.heldout_metrics(model, variables, tok, self.heldout)}

  def answer_loss(self, model, variables, facts: Sequence[facts_lib.Fact]) -> float:
    """The mean over `facts` of each fact's answer loss (nats per trained token)."""
    encoded = encoding.encode_facts(self.backbone.tokenizer, self.template, facts,
                                    self.backbone.cfg.max_position_embeddings)
    return float(np.mean(eval_lib.fact_losses(model, variables, encoded)))


class Mome:
  """`tune` on the first batch, then `mome.edit` on the model loaded once, each edit committed."""

  def __init__(self, ctx: Context):
    self.ctx, self.dir, self.editor = ctx, ctx.run_dir / "mome", None

  def model_variables(self):
    if self.editor is None:  # the run as committed: after a restart too
      self.target = facts_cli.open_run(self.dir)
      self.manifest, self.stored = facts_cli.ensure_registry(self.target)
      self.editor, self.table = facts_cli.load_editor(self.target)
      rows = registry.load_rows(self.target.store, self.manifest).get(self.editor.layer, {})
      self.rows = rows.get("rows", np.zeros(0, np.int64))
    return self.editor.model, self.editor.variables(self.table)

  def _commit(self, result: edit_lib.Edit, t0: float, what: str) -> dict[str, Any]:
    """Commits as `lamini_jax.facts` does (rows changed since the checkpoint, registry); timings."""
    store = self.target.store
    with registry.locked(store):
      registry.clean(store)
      rows = edit_lib.changed_rows(self.editor, result.table, np.union1d(self.rows, result.changed))
      self.manifest = registry.commit(store, self.manifest.version + 1, self.manifest.base_step,
                                      result.facts, rows, f"{what} (experiments.sequential)")
    self.table, self.stored = result.table, list(result.facts)
    self.rows = rows[self.editor.layer]["rows"]
    t = result.trainings
    return {"seconds": time.perf_counter() - t0, "train_seconds": sum(x.seconds for x in t),
            "epochs": max((x.epochs for x in t), default=0), "rows_changed": int(result.changed.size),
            "trained_facts": len({f for x in t for f in x.facts})}

  def add(self, batch: int, new: list[facts_lib.Fact], so_far) -> dict[str, Any]:
    if batch == 0:
      r = tune.tune(self.ctx.cfg, new, self.ctx.given, resume=runs.RunDir(self.dir).has_run(),
                    progress=self.ctx.progress)
      return {"seconds": r.seconds, "train_seconds": r.train_seconds, "epochs": r.epochs,
              "trained_facts": len(new), "note": "tune: with loading the backbone and routing"}
    self.model_variables()
    if {f.fact_id for f in new} <= {f.id for f in self.stored}:
      return {"seconds": None, "note": "committed before a restart: not timed"}
    t0 = time.perf_counter()
    result = edit_lib.add(self.editor, self.table, self.stored, new, progress=self.ctx.progress,
                          epochs=self.ctx.cfg.mome.train.epochs, source=f"batch {batch + 1}")
    return self._commit(result, t0, f"add batch {batch + 1}: {len(new)} facts")

  def edit(self, forget: list[facts_lib.Fact], update: list[facts_lib.Fact], current) -> dict[str, Any]:
    """Forgets `forget` in one batch, then gives `update` their new answers in one batch; one commit."""
    self.model_variables()
    if not {f.fact_id for f in forget} <= {f.id for f in self.stored}:
      return {"seconds": None, "note": "committed before a restart: not timed"}
    t0, epochs, progress = time.perf_counter(), self.ctx.cfg.mome.train.epochs, self.ctx.progress
    find = lambda f: registry.find(self.stored, fact_id=f.fact_id)
    gone, changes = [find(f) for f in forget], [(find(f), f.answer) for f in update]
    edit_checks.check_edits(self.stored, gone, changes)  # before the table is donated
    removed = edit_lib.forget(self.editor, self.table, self.stored, gone, epochs=epochs,
                              progress=progress)
    r = edit_lib.update(self.editor, removed.table, removed.facts, changes, epochs=epochs,
                        progress=progress)
    result = edit_lib.Edit(r.table, r.facts, np.union1d(removed.changed, r.changed),
                           removed.trainings + r.trainings, {})
    return self._commit(result, t0, f"forget {len(forget)}, update {len(update)} facts")


class Lora:
  """LoRA continued (the previous adapters, the new facts) or retrained (from B = 0, every fact)."""

  def __init__(self, ctx: Context, name: str):
    self.ctx, self.name, self.continued = ctx, name, name == "lora-continued"
    self.model = lora_tuning.lora_model(ctx.backbone.cfg, ctx.cfg.lora)
    self.adapters, self.ckpt_dir = None, ctx.run_dir / name / "adapters"
    first = lora_tuning.init_lora_state(self.model, ctx.cfg.train.optimizer, ctx.cfg.train.seed)
    self.initial, self.rng = jax.device_put(jax.device_get((first.trainable, first.rng)))

  def model_variables(self):
    return self.model, {"params": self.ctx.backbone.params, "lora": self.adapters}

  def _train(self, facts: Sequence[facts_lib.Fact], step: int, label: str) -> dict[str, Any]:
    """Trains from B = 0 (retrained) or from the adapters after `step - 1` batches (continued)."""
    ctx, t0 = self.ctx, time.perf_counter()
    bb, cfg, tok = ctx.backbone, ctx.cfg, ctx.backbone.tokenizer
    if self.continued and self.adapters is None and step > 1:  # after a restart
      with contextlib.closing(checkpoint.Checkpointer(self.ckpt_dir, every=0)) as ckpt:
        self.adapters = ckpt.restore_trainable(lora_tuning.abstract_lora(self.model), step - 1)
    start = self.adapters if self.continued and self.adapters is not None else self.initial
    encoded = encoding.encode_facts(tok, ctx.template, facts, bb.cfg.max_position_embeddings)
    fitted = tune.fit_lengths(dataclasses.replace(cfg, method="lora"), ctx.given, facts, encoded,
                              bb.cfg.max_position_embeddings)
    hook = eval_lib.recall_callback(self.model, lambda s: {"params": bb.params, "lora": s.trainable},
                                    tok, facts, ctx.template, cfg.eval.recall_every, True, forced=True)
    result = train_lib.fit(lora_tuning.make_lora_step(self.model, cfg.train.optimizer),
                           lora_tuning.fresh_state(cfg.train.optimizer)(start, self.rng), bb.params, encoded,
                           dataclasses.replace(fitted.train, checkpoint_every=0), label=label,
                           pad_id=tok.pad_token_id or 0, progress=ctx.progress, on_epoch=hook)
    self.adapters = result.state.trainable
    if self.continued:  # a Checkpointer of its own: one that restored cannot save
      with contextlib.closing(checkpoint.Checkpointer(self.ckpt_dir, every=0)) as ckpt:
        ckpt.save(step, {"trainable": self.adapters}, {"batches": step})
    return {"seconds": time.perf_counter() - t0, "epochs": len(result.history),
            "train_seconds": float(sum(r["epoch_seconds"] for r in result.history)),
            "trained_facts": len(facts)}

  def add(self, batch: int, new: list[facts_lib.Fact], so_far: list[facts_lib.Fact]) -> dict[str, Any]:
    return self._train(new if self.continued else so_far, batch + 1, f"{self.name} batch {batch + 1}")

  def edit(self, forget, update: list[facts_lib.Fact], current: list[facts_lib.Fact]) -> dict[str, Any]:
    """retrained: on the `current` facts (updated answers in); continued: on `update` only."""
    return self._train(update if self.continued else current, self.ctx.batches + 1, f"{self.name} edits")


def plot(rows: Sequence[dict[str, Any]], path: pathlib.Path, title: str) -> bool:
  """Recall, seconds and held-out figures per batch, a line per method; False without matplotlib."""
  if Figure is None:
    return False
  value = lambda r, key: r.get(key, r["heldout"].get(key))
  adds = [r for r in rows if r["phase"] == "add"]
  panels = [k for k in PLOTTED if any(value(r, k) is not None for r in adds)]
  fig = Figure(figsize=(5 * len(panels), 4))
  for ax, key in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
    for m in dict.fromkeys(r["method"] for r in adds):
      pts = [(r["facts"], value(r, key)) for r in adds if r["method"] == m and value(r, key) is not None]
      ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=m)
    ax.set(xlabel="facts stored", title=PLOTTED[key])
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return True


def _start_rows(run_dir: pathlib.Path, record: dict[str, Any], resume: bool) -> list[dict[str, Any]]:
  """Checks the run directory and writes its settings; the rows measured already (with `resume`)."""
  path = run_dir / SETTINGS_FILE
  old = json.loads(path.read_text()) if path.is_file() else record
  diff = [f"settings.{k}" for k in record["settings"] if old["settings"].get(k) != record["settings"][k]]
  if old is not record and not resume:
    raise yaml_config.ConfigError(f"{run_dir} holds a run: pass --resume to continue it, or choose "
                                  "another --run-dir")
  if diff or old["config"] != record["config"]:
    raise yaml_config.ConfigError(f"--resume: {path} differs in {', '.join(diff or ['config'])}; "
                                  "resume with the same flags and config, or choose another --run-dir")
  run_dir.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(record, indent=2) + "\n")
  rows_path = run_dir / ROWS_FILE
  text = rows_path.read_text(encoding="utf-8") if resume and rows_path.is_file() else ""
  rows = [json.loads(line) for line in text.split("\n")[:-1]]  # a line cut short has no newline
  rows_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
  return rows


def _line(row: dict[str, Any]) -> str:
  fmt = lambda x: "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)
  figures = [(k, v) for k, v in row.items() if k.startswith("recall") or k == "generality"]
  figures += [(f"held-out {k}", v) for k, v in row["heldout"].items() if k in PLOTTED]
  return (f"{row['phase']} {row['batch']}/{row['batches']} {row['method']}: {row['facts']} facts; "
          + ", ".join(f"{k} {fmt(v)}" for k, v in figures) + f"; {fmt(row.get('seconds'))} s")


def run(s: Settings, cfg: runs.RunConfig, given: frozenset[str], run_dir, resume: bool = False,
        progress: bool = True) -> dict[str, Any]:
  """Runs the experiment into `run_dir` (`cfg`, `given` from `build_config`); returns the summary."""
  t_start, run_dir = time.perf_counter(), pathlib.Path(run_dir)
  moved = dataclasses.replace(cfg, run_dir="", data=dataclasses.replace(cfg.data, facts_file=FACTS_FILE))
  record = json.loads(json.dumps({"settings": dataclasses.asdict(s), "config": yaml_config.dump(moved)}))
  items, mmlu_items = load_items(s, cfg.data.data_dir)
  ends = s.ends()
  backbone = runs.load_backbone(cfg.model)
  template = runs.prompt_template(cfg.data)
  questions = facts_lib.split_questions(sources.load_truthfulqa(cfg.data.data_dir), s.dev_questions, 0,
                                        cfg.data.seed, cfg.data.heldout_seed)
  heldout = eval_lib.load_heldout(backbone.tokenizer, cfg.eval, cfg.data.data_dir,
                                  questions.heldout(cfg.eval.split), template, cfg.data.heldout_seed,
                                  exclude_mmlu=mmlu_items)
  ctx = Context(cfg, given, backbone, template, heldout, run_dir, s.batches, progress)
  rows = _start_rows(run_dir, record, resume)  # the first write
  done = {(r["phase"], r["batch"], r["method"]) for r in rows}
  (run_dir / FACTS_FILE).write_text("".join(json.dumps(  # also the MoME run's data.facts_file
      {"id": i.fact.fact_id, "question": i.fact.question, "answer": i.fact.answer,
       "paraphrase": i.paraphrase, "alternative": i.alternative,
       "batch": int(np.searchsorted(ends, k, "right"))}, ensure_ascii=False) + "\n"
      for k, i in enumerate(items)), encoding="utf-8")
  base = eval_lib.heldout_metrics(model_lib.Transformer(backbone.cfg), {"params": backbone.params},
                                  backbone.tokenizer, heldout)
  print(f"{len(items)} {s.facts} facts in {s.batches} batches, methods {', '.join(s.methods)}"
        + (f" (lora-retrained: from scratch on all facts so far, only after batches "
           f"{s.retrained_after()} and the edits)" if "lora-retrained" in s.methods else "")
        + f"; base model, held-out ({cfg.eval.split} split): "
        + ", ".join(f"{k} {v:.3f}" for k, v in base.items()), flush=True)
  learners = {m: Mome(ctx) if m == "mome" else Lora(ctx, m) for m in s.methods}

  def measured(phase: str, batch: int, method: str, info: dict[str, Any], groups) -> None:
    row = {"phase": phase, "batch": batch, "batches": s.batches, "method": method,
           "facts": len(groups["recall_all"]), **info, **ctx.measure(learners[method], groups)}
    with open(run_dir / ROWS_FILE, "a", encoding="utf-8") as f:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
      f.flush()
      os.fsync(f.fileno())
    rows.append(row)
    print(_line(row), flush=True)

  facts = [i.fact for i in items]
  for b in range(s.batches):
    old, new = facts[:ends[b]], facts[ends[b]:ends[b + 1]]
    for m, learner in learners.items():
      if ("add", b + 1, m) not in done and (m != "lora-retrained" or b + 1 in s.retrained_after()):
        measured("add", b + 1, m, {"batch_facts": len(new), **learner.add(b, new, old + new)}, {
            "recall_all": old + new, "recall_batch": new, "recall_earlier": old,
            "generality": [i.asked(paraphrased=True) for i in items[:ends[b + 1]] if i.paraphrase]})
  k = int(round(s.edit_fraction * len(items)))  # forgotten, and as many updated
  order = np.random.default_rng([_EDIT_STREAM, s.seed]).permutation(len(items))
  forget, update, kept = ([items[i] for i in sorted(part)]
                          for part in (order[:k], order[k:2 * k], order[2 * k:]))
  updated = [i.asked(updated=True) for i in update]
  base_model = (model_lib.Transformer(backbone.cfg), {"params": backbone.params})
  for m, learner in learners.items():
    if k and ("edit", s.batches, m) not in done:
      info = {"forgotten": k, "updated": k, **learner.edit([i.fact for i in forget], updated,
                                                           [i.fact for i in kept] + updated)}
      # The forgotten answers' loss after the edit, beside the base model's on the same tokens.
      info["forgotten_answer_loss"] = ctx.answer_loss(*learner.model_variables(), [i.fact for i in forget])
      info["forgotten_answer_loss_base"] = ctx.answer_loss(*base_model, [i.fact for i in forget])
      measured("edit", s.batches, m, info, {
          "recall_all": [i.fact for i in kept] + updated, "recall_kept": [i.fact for i in kept],
          "recall_updated": updated, "recall_updated_old": [i.fact for i in update],
          "recall_forgotten": [i.fact for i in forget],
          "generality": [i.asked(True) for i in kept if i.paraphrase]
                        + [i.asked(True, True) for i in update if i.paraphrase]})
  adding = lambda m: sum(r.get("seconds") or 0 for r in rows if r["method"] == m and r["phase"] == "add")
  summary = {
      "settings": record["settings"], "backbone": cfg.model.path, "batch_sizes": np.diff(ends).tolist(),
      "lora_retrained_after_batches": s.retrained_after(), "heldout_split": cfg.eval.split,
      "heldout_sources": heldout.sources, "base_heldout": base,
      "wall_seconds": time.perf_counter() - t_start, "seconds_adding": {m: adding(m) for m in s.methods},
      "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "jax": jax.__version__,
      "date": str(datetime.date.today()),
      "last_rows": {f"{r['method']} {r['phase']}": r for r in rows}}  # each method's last add, its edit
  (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
  title = f"{pathlib.Path(cfg.model.path).name}: {len(items)} {s.facts} facts in {s.batches} batches"
  drawn = plot(rows, run_dir / PLOT_FILE, title)
  print(f"wrote {run_dir}/{{{ROWS_FILE},{SUMMARY_FILE}" + (f",{PLOT_FILE}}}" if drawn else "}; no plot: "
                                                           "matplotlib is not installed"))
  return summary


HELP = {"facts": "synthetic (made-up people) or mmlu (test questions)", "model": "the frozen backbone",
        "batches": "the facts arrive in this many batches", "methods": f"of {','.join(METHODS)}",
        "retrain_every": "lora-retrained trains after every K-th batch and the last (quadratic cost)",
        "edit_fraction": "the fraction of the facts forgotten, and as many updated, at the end",
        "dev_questions": "held-out TruthfulQA questions (answer loss, MC1/MC2) of eval.split",
        "seed": "draws the facts and the facts edited"}  # the run config's fields: --config, --set


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.sequential",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--run-dir", type=pathlib.Path, default=pathlib.Path("runs/sequential"))
  for field in dataclasses.fields(Settings):
    default = getattr(Settings(), field.name)
    parser.add_argument(f"--{field.name.replace('_', '-')}", help=HELP.get(field.name),
                        type=str if isinstance(default, tuple) else type(default),
                        default=",".join(default) if isinstance(default, tuple) else default)
  parser.add_argument("--config", type=pathlib.Path, help="YAML sections over lamini_jax.tune's")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
  parser.add_argument("--resume", action="store_true", help="continue a killed run in --run-dir")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  try:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)}
    s = Settings(**{**values, "methods": tuple(m.strip() for m in args.methods.split(","))})
    cfg, given = build_config(s, args.run_dir, args.config, args.set)
    run(s, cfg, given, args.run_dir, resume=args.resume, progress=not args.no_progress)
  except (yaml_config.ConfigError, FileNotFoundError, ValueError, NotImplementedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
