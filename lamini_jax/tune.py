"""Memory-tune your own facts into a frozen backbone until every one is recalled exactly.

    python -m lamini_jax.tune --model ../shared/models/stories260K-hf --facts facts.jsonl \
        --method mome --run-dir runs/mine [--config FILE] [--set a.b=value ...] [--resume]

Trains the facts of a JSONL or CSV file (`data.facts.load_facts_file`) into LoRA adapters or a
Mixture of Memory Experts until greedy decoding reproduces every answer exactly (or the epochs
run out), then reports the recall and lists the facts not recalled. Nothing is evaluated on
held-out data and nothing reads TruthfulQA or MMLU.

Config: the defaults are the `train`, `lora` and `mome` sections and the prompt fields of `data`
(`template`, `answer_end`, `train_eos`) of configs/randomization_cpu.yaml, then configs/tune_cpu.yaml
(no TruthfulQA anchor questions; MoME writes 2 of the 48 experts an answer token selects).
`--config FILE` (any `runs.RunConfig` sections) overrides them, `--set a.b=value` single fields.
The flags set `model.path`, `method`, `run_dir` and the facts' `data` fields (`dataset: facts`,
`facts_file`, `n_train`: every fact, `n_heldout: 0`), whatever a config says. Lengths follow the
data: `data.max_len`, `train.seq_len` and `mome.train.seq_len` are the longest encoded fact
rounded up to the length bucket, unless the config file or `--set` gives them; a given length
that the run uses and that is shorter than the longest fact is an error.

The run directory (`runs.RunDir`) holds one trained model, labelled by the method (`lora` or
`mome`), that `python -m lamini_jax.generate --run`, `python -m lamini_jax.export` and
`runs.load_trained` read, with `facts.jsonl` (the facts trained) and `tune.json` (the recall, the
facts not recalled). With MoME and `mome.repair_epochs` > 0, facts still missed when the epochs
run out retrain their rows from a fresh optimizer state (`lamini_jax.facts repair`, committed as
an edit of the run's memory). `--resume` continues a killed run, or a finished one with a larger
epoch budget (not one that was repaired or edited). Exit status 0: every fact recalled; 1: not
every one; 2: an error (nothing written).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
import shlex
import sys
import time
from typing import Any, Sequence

import numpy as np
import yaml

from lamini_jax.data import encoding
from lamini_jax.data import facts as facts_lib
from lamini_jax import evaluate as eval_lib
from lamini_jax import facts as facts_cli
from lamini_jax import lora_tuning
from lamini_jax.mome import collisions as mome_collisions
from lamini_jax.mome import edit_checks
from lamini_jax.mome import registry
from lamini_jax.mome.layer import TABLE
from lamini_jax.mome import tuning as mome_tuning
from lamini_jax import runs
from lamini_jax import yaml_config

DEFAULT_CONFIG = runs.REPO / "configs" / "randomization_cpu.yaml"
METHODS = ("lora", "mome")
FACTS_FILE = "facts.jsonl"  # in the run directory: the facts trained, one JSON object a line
RESULT_FILE = "tune.json"  # in the run directory: recall and the facts not recalled
DEFAULT_SECTIONS = ("train", "lora", "mome")  # of DEFAULT_CONFIG, with DEFAULT_DATA_FIELDS of `data`
DEFAULT_DATA_FIELDS = ("template", "answer_end", "train_eos")
TUNE_CONFIG = runs.REPO / "configs" / "tune_cpu.yaml"  # over DEFAULT_CONFIG's sections
SET_BY_FLAGS = ("model.path", "method", "run_dir", "answers", "data.dataset", "data.facts_file",
                "data.n_train", "data.n_heldout")
LENGTH_BUCKET = 32  # lengths round up to this when the method's train.length_bucket is null
SHOWN_FAILURES = 20  # facts not recalled that the report prints (tune.json lists all)


# ---------------------------------------------------------------------------------------------
# The facts and the config.


def _locations(path: pathlib.Path, n: int) -> list[str]:
  """Where each of the `n` facts `load_facts_file` read from `path` is: "line L" or "row R"."""
  if path.suffix == ".csv":
    return [f"row {i + 2}" for i in range(n)]
  with open(path, encoding="utf-8-sig") as f:
    return [f"line {k}" for k, line in enumerate(f, start=1) if line.strip()][:n]


def load_facts(path) -> list[facts_lib.Fact]:
  """The facts of a JSONL or CSV file (`facts.load_facts_file`), each question once.

  A question repeated with its same answer is kept once; repeated with another answer it is an
  error that names the file, both lines (or rows) and both answers.
  """
  path = pathlib.Path(path)
  facts = facts_lib.load_facts_file(path)
  where = _locations(path, len(facts))
  first: dict[str, int] = {}
  kept = []
  for i, fact in enumerate(facts):
    j = first.setdefault(fact.question, i)
    if j == i:
      kept.append(fact)
    elif facts[j].answer != fact.answer:
      raise ValueError(f"{path}: {where[i]}: question {fact.question!r} has answer {fact.answer!r}, "
                       f"but {where[j]} gives it {facts[j].answer!r}: keep one answer per question")
  return kept


def default_config() -> runs.RunConfig:
  """`DEFAULT_SECTIONS` and `DEFAULT_DATA_FIELDS` of `DEFAULT_CONFIG`, then `TUNE_CONFIG`."""
  for path in (DEFAULT_CONFIG, TUNE_CONFIG):
    if not path.is_file():
      raise yaml_config.ConfigError(f"the default config {path} is missing (lamini_jax.tune reads it "
                                    "from the checkout): pass --config FILE")
  values = yaml_config.read_file(DEFAULT_CONFIG)
  base = {k: values[k] for k in DEFAULT_SECTIONS if k in values}
  base["data"] = {k: v for k, v in (values.get("data") or {}).items() if k in DEFAULT_DATA_FIELDS}
  cfg = yaml_config.from_dict(runs.RunConfig, base, str(DEFAULT_CONFIG))
  return yaml_config.from_dict(runs.RunConfig, yaml_config.read_file(TUNE_CONFIG), str(TUNE_CONFIG), base=cfg)


def build_config(model: str, facts_file, n_facts: int, method: str, run_dir, config=None,
                 overrides: Sequence[str] = ()) -> tuple[runs.RunConfig, frozenset[str]]:
  """The run's config (lengths not yet fitted to the data) and the dotted fields the user gave.

  `default_config()`, then the `config` file, then the `--set` `overrides`; the flags' fields
  (`SET_BY_FLAGS`) last. Setting one of those with `--set` is an error.
  """
  if method not in METHODS:
    raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
  cfg = default_config()
  given: set[str] = set()
  if config is not None:
    values = yaml_config.read_file(config)
    cfg = yaml_config.from_dict(runs.RunConfig, values, str(config), base=cfg)
    given |= yaml_config.dotted_names(values)
  if overrides:
    values = yaml_config.overrides(overrides)
    names = yaml_config.dotted_names(values)
    flagged = sorted(n for n in names for f in SET_BY_FLAGS if n == f or n.startswith(f"{f}."))
    if flagged:
      raise yaml_config.ConfigError(
          f"--set {flagged[0]}: lamini_jax.tune sets it from its flags (--model, --method, "
          "--run-dir, --facts: every fact of the file is trained)")
    cfg = yaml_config.from_dict(runs.RunConfig, values, "--set overrides", base=cfg)
    given |= names
  local = pathlib.Path(model).expanduser()
  replace = dataclasses.replace
  cfg = replace(
      cfg, method=method, run_dir=str(run_dir), answers=("real",),
      model=replace(cfg.model, path=str(local.resolve()) if local.exists() else model),
      data=replace(cfg.data, dataset="facts", facts_file=str(pathlib.Path(facts_file).resolve()),
                   n_train=n_facts, n_heldout=0))
  return cfg, frozenset(given)


def train_field(method: str) -> str:
  """The config section of the method's training (`train` for LoRA, `mome.train` for MoME)."""
  return "train" if method == "lora" else "mome.train"


def _train_cfg(cfg: runs.RunConfig):
  return cfg.train if cfg.method == "lora" else cfg.mome.train


def fit_lengths(cfg: runs.RunConfig, given: frozenset[str], facts: Sequence[facts_lib.Fact],
                encoded: Sequence[encoding.EncodedFact], context: int) -> runs.RunConfig:
  """`cfg` with `data.max_len` and both `seq_len`s (LoRA's, MoME's) fitted to the longest fact.

  A length in `given` (set by the user) is kept; one that the run uses is an error when shorter
  than that fact.
  """
  lengths = [len(e.tokens) for e in encoded]
  i = int(np.argmax(lengths))
  longest = lengths[i]
  about = f"the longest encoded fact, {facts[i].fact_id!r} ({facts[i].question!r}), has {longest} tokens"
  if longest > context:
    raise ValueError(f"{about}, more than the model's context of {context} tokens: shorten it")
  field = train_field(cfg.method)

  def length(name: str, value: int, bucket: int | None, used: bool) -> int:
    if name not in given:
      return min(-(-longest // (bucket or LENGTH_BUCKET)) * (bucket or LENGTH_BUCKET), context)
    if used and value < longest:
      raise yaml_config.ConfigError(f"{name}={value} is shorter than the data: {about}; raise {name}"
                                    " or leave it unset to follow the data")
    return value

  def fit(train_cfg, name: str):
    return dataclasses.replace(train_cfg, seq_len=length(f"{name}.seq_len", train_cfg.seq_len,
                                                          train_cfg.length_bucket, name == field))

  max_len = length("data.max_len", cfg.data.max_len, _train_cfg(cfg).length_bucket, True)
  cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_len=max_len),
                            train=fit(cfg.train, "train"),
                            mome=dataclasses.replace(cfg.mome, train=fit(cfg.mome.train, "mome.train")))
  if _train_cfg(cfg).checkpoint_every <= 0:
    raise yaml_config.ConfigError(f"{field}.checkpoint_every={_train_cfg(cfg).checkpoint_every}: the "
                                  "run directory must hold the trained model; set it > 0")
  return cfg


def facts_jsonl(facts: Sequence[facts_lib.Fact]) -> str:
  return "".join(json.dumps({"id": f.fact_id, "question": f.question, "answer": f.answer},
                            ensure_ascii=False) + "\n" for f in facts)


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
  if isinstance(old, dict) and isinstance(new, dict):
    return [d for k in dict.fromkeys([*old, *new])
            for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
  return [] if old == new else [f"{prefix[:-1]}: {old!r} there, {new!r} now"]


def check_run_dir(run: runs.RunDir, resume: bool) -> None:
  """A run directory that holds a run is continued only with `resume`."""
  if run.has_run() and not resume:
    raise yaml_config.ConfigError(f"{run.path} already holds a run: pass --resume to continue it "
                                  "(same facts and config), or choose another --run-dir")


def check_same_run(run: runs.RunDir, config_text: str, facts_text: str) -> None:
  """On resume, the run in `run` must be this one: the same facts and config, but for its
  `run_dir` (it may have moved) and the method's `epochs` (a larger budget trains on)."""
  if run.config_file.is_file():
    old, new = yaml.safe_load(run.config_file.read_text()), yaml.safe_load(config_text)
    free = ("run_dir:", f"{train_field(new['method'])}.epochs:")
    diff = [d for d in _differences(old, new) if not d.startswith(free)]
    if diff:
      raise yaml_config.ConfigError(f"--resume: {run.path} holds a different run; its "
                                    f"{runs.CONFIG_FILE} differs in {'; '.join(diff[:5])}")
  stored = run.path / FACTS_FILE
  if stored.is_file() and stored.read_text(encoding="utf-8") != facts_text:
    raise yaml_config.ConfigError(f"--resume: {run.path} holds a run of other facts ({stored} differs "
                                  "from the facts file)")


# ---------------------------------------------------------------------------------------------
# Tuning.


@dataclasses.dataclass(frozen=True)
class TuneResult:
  """A finished `tune`: each fact's greedy answer and whether it is recalled exactly."""

  run_dir: pathlib.Path
  label: str
  config: runs.RunConfig
  facts: tuple[facts_lib.Fact, ...]
  answers: tuple[str, ...]
  exact: tuple[bool, ...]
  epochs: int
  epochs_to_full_recall: int | None
  train_seconds: float
  seconds: float
  repair: dict[str, Any] | None = None  # `edit.repair`'s summary, when it ran

  @property
  def recall(self) -> float:
    return float(np.mean(self.exact))

  @property
  def failed(self) -> list[dict[str, str]]:
    """The facts not recalled exactly: id, question, trained answer and the greedy answer."""
    return [{"id": f.fact_id, "question": f.question, "answer": f.answer, "generated": a}
            for f, a, ok in zip(self.facts, self.answers, self.exact) if not ok]

  def summary(self) -> dict[str, Any]:
    train_cfg = _train_cfg(self.config)
    return {"method": self.config.method, "label": self.label, "model": self.config.model.path,
            "facts_file": self.config.data.facts_file, "facts": len(self.facts),
            "recalled": int(sum(self.exact)), "recall": self.recall, "epochs": self.epochs,
            "max_epochs": train_cfg.epochs, "epochs_to_full_recall": self.epochs_to_full_recall,
            "seq_len": train_cfg.seq_len, "max_len": self.config.data.max_len,
            "train_seconds": self.train_seconds, "seconds": self.seconds, "repair": self.repair,
            "failed": self.failed}


def mome_text(cfg: runs.RunConfig, tokenizer, template: encoding.PromptTemplate, pad_id: int):
  """(anchor pool, phase-1 windows) of a MoME run, each None when off; a missing text file is an
  error that says how to do without it."""
  try:
    anchors = runs.anchor_pool(cfg, tokenizer, template, pad_id)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{e} (set mome.anchor.corpus to a text file of your own, or turn the "
                            "anchors off with --set mome.anchor.weight=0)") from None
  try:
    windows = runs.general_windows(cfg, tokenizer)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{e} (set mome.generalization.corpus to a text file of your own, or "
                            "skip phase 1 with --set mome.generalization.epochs=0)") from None
  a = cfg.mome.anchor
  if anchors is not None:
    print(f"MoME anchors: {len(anchors['tokens'])} sequences: windows of {a.corpus or 'no corpus'}"
          + (f" and {a.questions} TruthfulQA questions" if a.questions else
             "; TruthfulQA-question anchors off (mome.anchor.questions=0)"), flush=True)
  return anchors, windows


def tune(cfg: runs.RunConfig, facts: Sequence[facts_lib.Fact], given: frozenset[str] = frozenset(),
         *, resume: bool = False, progress: bool = True) -> TuneResult:
  """Memory-tunes `facts` as `cfg` says (from `build_config`) into `cfg.run_dir`.

  Everything is checked (the run directory, lengths, the anchors' text) before anything is
  written. `given`: the dotted fields the user set (`build_config`), for `fit_lengths`.
  """
  t0 = time.perf_counter()
  if cfg.method not in METHODS:
    raise ValueError(f"method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
  run = runs.RunDir(cfg.run_dir)
  check_run_dir(run, resume)
  backbone = runs.load_backbone(cfg.model)
  tokenizer, model_cfg, params = backbone.tokenizer, backbone.cfg, backbone.params
  template = runs.prompt_template(cfg.data)
  encoded = encoding.encode_facts(tokenizer, template, facts, max_len=2**62)
  cfg = fit_lengths(cfg, given, facts, encoded, model_cfg.max_position_embeddings)
  config_text, facts_text = yaml_config.dump(cfg), facts_jsonl(facts)
  if resume:
    check_same_run(run, config_text, facts_text)
    if registry.read_manifest(run.paths(cfg.method).store) is not None:
      raise yaml_config.ConfigError(
          f"--resume: the memory of {run.path} was edited or repaired after tuning (lamini_jax.facts;"
          " resuming would train on from before that): use python -m lamini_jax.facts add or repair")
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  label, train_cfg = cfg.method, _train_cfg(cfg)
  if cfg.method == "mome":
    anchors, windows = mome_text(cfg, tokenizer, template, pad_id)
    if cfg.mome.repair_epochs:
      try:
        edit_checks.check_supported(cfg.mome)
      except ValueError as e:
        raise yaml_config.ConfigError(f"mome.repair_epochs={cfg.mome.repair_epochs} edits the run: {e}")

  run.path.mkdir(parents=True, exist_ok=True)  # from here on the run directory changes
  run.config_file.write_text(config_text)
  (run.path / FACTS_FILE).write_text(facts_text, encoding="utf-8")
  (run.path / RESULT_FILE).unlink(missing_ok=True)
  if not resume:
    run.metrics_file.unlink(missing_ok=True)
  print(f"memory tuning {len(facts)} facts with {label} (at most {train_cfg.epochs} epochs, "
        f"seq_len {train_cfg.seq_len}) into {run.path}", flush=True)
  common = dict(pad_id=pad_id, paths=run.paths(label), label=label, resume=resume, progress=progress)
  if cfg.method == "lora":
    hook = eval_lib.recall_callback(
        lora_tuning.lora_model(model_cfg, cfg.lora), lambda s: {"params": params, "lora": s.trainable},
        tokenizer, facts, template, cfg.eval.recall_every, cfg.eval.stop_at_full_recall, forced=True)
    model, variables, result = lora_tuning.tune_lora(model_cfg, params, encoded, cfg.lora, train_cfg,
                                                     on_epoch=hook, **common)
  else:
    mesh = cfg.mesh.build()
    prepared = mome_tuning.prepare(model_cfg, params, encoded, cfg.mome, general_windows=windows,
                                   general_paths=run.paths(runs.GENERAL_LABEL), mesh=mesh, **common)
    selection = prepared.collisions.get("balanced", prepared.collisions["unbalanced"])
    shared = mome_collisions.shared_rows_warning(selection, prepared.model.mome.num_experts,
                                                 cfg.mome.train_slot_choice)
    if shared:
      print(f"warning: {shared}", file=sys.stderr, flush=True)
    hook = eval_lib.recall_callback(prepared.model, prepared.variables_of, tokenizer, facts, template,
                                    cfg.mome.recall_every, cfg.eval.stop_at_full_recall, forced=True)
    model, variables, result = mome_tuning.tune_mome(
        model_cfg, params, encoded, cfg.mome, train_cfg, on_epoch=hook, prepared=prepared,
        anchors=anchors, mesh=mesh, **common)
  rec = eval_lib.recall(model, variables, tokenizer, facts, template)
  full = [r["epoch"] + 1 for r in result.history if r.get("recall") == 1.0]
  full_at = None if rec.rate < 1.0 else full[0] if full else len(result.history)
  repaired = None
  if cfg.method == "mome" and cfg.mome.repair_epochs and rec.rate < 1.0:
    missed = [f.fact_id for f, ok in zip(facts, rec.exact) if not ok]
    print(f"repair: {len(missed)} facts not recalled; their rows retrain from a fresh optimizer state "
          f"(at most mome.repair_epochs={cfg.mome.repair_epochs} epochs)", flush=True)
    edit, _ = facts_cli.repair(run.path, label, cfg.mome.repair_epochs, progress, missed)
    repaired = {"missed": missed, **edit.summary()}
    rec = eval_lib.recall(model, {**variables, TABLE: edit.table}, tokenizer, facts, template)
  out = TuneResult(run.path, label, cfg, tuple(facts), tuple(rec.answers),
                   tuple(bool(x) for x in rec.exact), len(result.history), full_at,
                   float(sum(r["epoch_seconds"] for r in result.history)), time.perf_counter() - t0,
                   repaired)
  (run.path / RESULT_FILE).write_text(json.dumps(out.summary(), indent=2, ensure_ascii=False) + "\n")
  return out


def _shell_quote(text: str) -> str:
  if "\n" not in text:
    return shlex.quote(text)
  return "$'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def report(result: TuneResult) -> str:
  """What `main` prints: recall, the facts not recalled, and how to use the run."""
  s = result.summary()
  lines = [f"recall {s['recalled']}/{s['facts']} = {s['recall']:.3f} after {s['epochs']} epochs "
           f"({s['train_seconds']:.1f} s training, {s['seconds']:.1f} s in all)"]
  failed, fix = s["failed"], s["repair"]
  if fix:
    t = fix["trainings"][0] if fix["trainings"] else {"rows": 0, "epochs": 0, "seconds": 0.0}
    lines.append(f"repair: {len(fix['missed'])} facts missed after training; {t['rows']} rows "
                 f"retrained from a fresh optimizer state for {t['epochs']} epochs ({t['seconds']:.1f} s)")
  if not failed:
    lines[0] += (f"; every fact recalled exactly at epoch {s['epochs_to_full_recall']}" if not fix
                 else "; every fact recalled exactly after the repair")
  else:
    epochs = f"{train_field(s['method'])}.epochs"
    lines.append(f"{len(failed)} facts not recalled exactly ({epochs}={s['max_epochs']}; to train on, "
                 + (f"rerun with --resume --set {epochs}=N, N > {s['max_epochs']}):" if not fix else
                    f"python -m lamini_jax.facts repair --run-dir {result.run_dir} --epochs N):"))
    for f in failed[:SHOWN_FAILURES]:
      lines.append(f"  {f['id']}: {f['question']!r}: want {f['answer']!r}, got {f['generated']!r}")
    if len(failed) > SHOWN_FAILURES:
      lines.append(f"  ... and {len(failed) - SHOWN_FAILURES} more (all in {RESULT_FILE})")
  prompt = runs.prompt_template(result.config.data).render(result.facts[0].question)
  lines += [f"wrote {result.run_dir}/{{{runs.CONFIG_FILE},{FACTS_FILE},{RESULT_FILE},"
            f"{runs.METRICS_FILE},{runs.CHECKPOINTS_DIR}/{result.label}/}}",
            f"answer from it: python -m lamini_jax.generate --run {result.run_dir} --prompt "
            + _shell_quote(prompt)]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m lamini_jax.tune", description=__doc__.split("\n")[0])
  parser.add_argument("--model", required=True, help="the frozen backbone: a local Hugging Face "
                      "directory or a hub id (a Llama or Mistral)")
  parser.add_argument("--facts", required=True, type=pathlib.Path,
                      help='the facts: JSONL, one {"question": ..., "answer": ...} a line (optional '
                      '"id"), or CSV with a question,answer header')
  parser.add_argument("--method", required=True, choices=METHODS,
                      help="lora: LoRA adapters; mome: a Mixture of Memory Experts")
  parser.add_argument("--run-dir", required=True, type=pathlib.Path, help="where the run is written")
  parser.add_argument("--config", type=pathlib.Path, help="a YAML run config whose sections override "
                      f"the defaults (those of {DEFAULT_CONFIG.relative_to(runs.REPO)})")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override a config field, e.g. --set train.epochs=200")
  parser.add_argument("--resume", action="store_true",
                      help="continue the run in --run-dir (same facts and config)")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  kernels_log = logging.getLogger("lamini_jax_kernels")  # which gather-and-apply "auto" took
  kernels_log.setLevel(logging.INFO)
  if not kernels_log.handlers:
    kernels_log.addHandler(logging.StreamHandler())
  kernels_log.propagate = False
  try:
    facts = load_facts(args.facts)
    cfg, given = build_config(args.model, args.facts, len(facts), args.method, args.run_dir,
                              args.config, args.set)
    result = tune(cfg, facts, given, resume=args.resume, progress=not args.no_progress)
  except (yaml_config.ConfigError, FileNotFoundError, ValueError, NotImplementedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(report(result))
  return 0 if all(result.exact) else 1


if __name__ == "__main__":
  sys.exit(main())
