"""Edit the memory of a MoME run: list, show, add, update and forget facts.

    python -m lamini_jax.facts list   --run-dir runs/x [--label L]
    python -m lamini_jax.facts show   --run-dir runs/x [--label L] (--id ID | --question Q)
    python -m lamini_jax.facts add    --run-dir runs/x [--label L] --facts new.jsonl [--epochs N]
    python -m lamini_jax.facts update --run-dir runs/x [--label L] (--id ID | --question Q) --answer A
    python -m lamini_jax.facts update --run-dir runs/x [--label L] --facts changes.jsonl
    python -m lamini_jax.facts forget --run-dir runs/x [--label L] (--id ID | --question Q)...
    python -m lamini_jax.facts repair --run-dir runs/x [--label L] [--epochs N]

A run of `python -m lamini_jax.tune --method mome` or `python -m experiments.randomization
--method mome` holds a MoME model under a label (`mome`, `mome-random`, ...; `--label` may be
left out when the run holds one model). Its fact registry (`mome.registry`) is made on first use
from the facts the run trained; `add`, `update` and `forget` change only the expert rows of the
facts they edit and of their collision neighbours (`mome.edit`) and commit the new table rows
and registry at once: a process killed at any point leaves the run as it was before the
command or as it is after it. `runs.load_trained`, `lamini_jax.generate --run` and
`lamini_jax.evaluate --run` read the committed version.

`forget` takes several facts (`--id` and `--question` repeat, and mix); `update --facts` reads a
JSONL or CSV file (as `add --facts` does) whose records name a stored fact by "id" (or
"fact_id") or by "question" and give its new "answer". Several facts are one edit and one
commit, with at most one retraining for `forget` and two for `update` whatever their number; a
bad batch (an id or question not stored, a fact named twice, an unchanged answer) is an error
that names it and changes nothing. `repair` retrains the rows of the stored facts that are not
recalled exactly, from a fresh optimizer state (`mome.edit.repair`; `lamini_jax.tune` runs it
when `mome.repair_epochs` > 0 and training ends with facts missed).

`--epochs` bounds each retraining (default: the run's `mome.train.epochs`); training stops as
soon as every fact it trains is recalled exactly. Exit status: 0 when every fact the edit
trained or could affect is recalled exactly (and no removed answer is produced); 1 when
the edit is committed but the report names facts for which that is not so; 2 on an error, which
changes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lamini_jax.checkpoint import Checkpointer
from lamini_jax.data import facts as facts_lib
from lamini_jax.mome import edit as edit_lib
from lamini_jax.mome import edit_checks
from lamini_jax.mome import registry
from lamini_jax.mome.inputs import token_routes
from lamini_jax.mome.layer import TABLE
from lamini_jax import runs
from lamini_jax import yaml_config

TUNE_FACTS = "facts.jsonl"  # `lamini_jax.tune` keeps the facts it trained here, in the run directory
SHOWN = 20  # rows and ids `show` prints before "..."


@dataclasses.dataclass(frozen=True)
class Target:
  """The MoME model of a run that the command edits."""

  run: runs.RunDir
  label: str
  config: runs.RunConfig

  @property
  def paths(self):
    return self.run.paths(self.label)

  @property
  def store(self) -> pathlib.Path:
    return self.paths.store


def open_run(run_dir, label: str | None = None) -> Target:
  """The run's MoME model, checked to be one that can be edited (`edit_checks.check_supported`)."""
  run = runs.RunDir(run_dir)
  config = run.config()
  label = run.resolve_label(label)
  if not run.is_mome(label):
    raise ValueError(f"{run.path}: {label!r} is not a MoME model (LoRA adapters spread every fact "
                     "over all their weights: change a LoRA run's facts by tuning again, see "
                     "docs/memory-tuning.md#editing-memory)")
  try:
    edit_checks.check_supported(config.mome)
  except ValueError as e:
    raise ValueError(f"{run.config_file}: {e}") from None
  return Target(run, label, config)


def run_facts(target: Target) -> list[facts_lib.Fact]:
  """The facts the run trained into `target.label`, as the run chose them."""
  data = target.config.data
  if data.dataset == "facts":
    tuned = target.run.path / TUNE_FACTS
    facts = facts_lib.load_facts_file(tuned if tuned.is_file() else data.facts_file)
    return edit_checks.checked_new_facts([], facts, str(tuned if tuned.is_file() else data.facts_file)
                                      )[:data.n_train]
  mode = target.label.rsplit("-", 1)[-1]
  if mode not in ("real", "random"):
    raise ValueError(f"{target.run.path}: label {target.label!r} names no answer mode (real or random)"
                     f" for its {data.dataset} facts")
  return runs.facts_and_heldout(data, mode)[0]


def load_editor(target: Target) -> tuple[edit_lib.Editor, Any]:
  """The editor of the committed model, and its table."""
  cfg = target.config
  backbone = runs.load_backbone(cfg.model)
  trained = runs.load_trained(target.run.path, target.label, backbone)
  tokenizer = backbone.tokenizer
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  variables = dict(trained.variables)
  table = variables.pop(TABLE)
  anchors = runs.anchor_pool(cfg, tokenizer, trained.template, pad_id)
  if anchors is not None:
    anchors = {**anchors, "experts": token_routes(trained.model, trained.variables, anchors["tokens"])}
    anchors = jax.tree.map(jnp.asarray, anchors)
  model = trained.model.clone(mome_mesh=None)
  return edit_lib.Editor(model, variables, cfg.mome, tokenizer, trained.template, pad_id,
                         anchors), table


def _created(target: Target, step: int) -> str:
  stamp = (target.paths.checkpoints / str(step)).stat().st_mtime
  return datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).isoformat(timespec="seconds")


def _first_version(target: Target, ed: edit_lib.Editor, table: Any
                   ) -> tuple[int, list[registry.StoredFact]]:
  """(training checkpoint step, registry of the facts the run trained into it)."""
  ckpt = Checkpointer(target.paths.checkpoints, every=0)
  step = ckpt.latest_step()
  ckpt.close()
  if step is None:
    raise FileNotFoundError(f"{target.paths.checkpoints}: no checkpoint of the trained table")
  return step, edit_lib.stored_facts(ed, table, run_facts(target), _created(target, step))


def ensure_registry(target: Target) -> tuple[registry.Manifest, list[registry.StoredFact]]:
  """The committed registry; made from the run's facts (version 0) when there is none."""
  if registry.read_manifest(target.store) is None:
    ed, table = load_editor(target)
    step, facts = _first_version(target, ed, table)
    with registry.locked(target.store):
      if registry.read_manifest(target.store) is None:
        registry.commit(target.store, 0, step, facts, {}, f"registry of the {len(facts)} trained facts")
  manifest = registry.read_manifest(target.store)
  return manifest, registry.load_facts(target.store, manifest)


def _edit(target: Target, operation: str, run_edit) -> tuple[edit_lib.Edit, registry.Manifest]:
  """Runs `run_edit(editor, table, stored facts) -> Edit` under the lock and commits its result.

  A run never listed nor edited gets its registry here, committed with the edit's result only.
  """
  with registry.locked(target.store):
    registry.clean(target.store)  # files of an edit killed before its commit
    ed, table = load_editor(target)
    manifest = registry.read_manifest(target.store)
    before = np.zeros(0, np.int64)  # rows that earlier versions changed
    if manifest is None:
      version = 0
      base_step, stored = _first_version(target, ed, table)
    else:
      version, base_step = manifest.version, manifest.base_step
      stored = registry.load_facts(target.store, manifest)
      before = registry.load_rows(target.store, manifest).get(ed.layer, {}).get("rows", before)
    result = run_edit(ed, table, stored)
    rows = edit_lib.changed_rows(ed, result.table, np.union1d(before, result.changed))
    committed = registry.commit(target.store, version + 1, base_step, result.facts, rows, operation)
  return result, committed


def _epochs(target: Target, epochs: int | None) -> int:
  epochs = target.config.mome.train.epochs if epochs is None else epochs
  if epochs < 1:
    raise ValueError(f"--epochs must be >= 1, got {epochs}")
  return epochs


def add(run_dir, facts_file, label: str | None = None, epochs: int | None = None,
        progress: bool = False) -> tuple[edit_lib.Edit, registry.Manifest]:
  """Adds the facts of a JSONL or CSV file (`data.facts.load_facts_file`) to a run's memory."""
  target = open_run(run_dir, label)
  new = facts_lib.load_facts_file(facts_file)
  n = _epochs(target, epochs)
  if registry.read_manifest(target.store) is not None:  # bad facts fail before any model loads
    edit_checks.checked_new_facts(ensure_registry(target)[1], new, str(facts_file))
  return _edit(target, f"add {len(new)} facts from {facts_file}", lambda ed, table, stored: edit_lib.add(
      ed, table, stored, new, epochs=n, progress=progress, source=str(facts_file)))


def _names(value: str | Sequence[str] | None) -> list[str]:
  """A flag's values: None, one string, or a sequence of them (a repeated flag)."""
  return [] if value is None else [value] if isinstance(value, str) else list(value)


def _forgotten(stored: Sequence[registry.StoredFact], ids: Sequence[str],
               questions: Sequence[str]) -> list[registry.StoredFact]:
  """The stored facts with these ids and questions, checked as one batch (`edit_checks.check_edits`)."""
  facts = ([registry.find(stored, fact_id=i) for i in ids]
           + [registry.find(stored, question=q) for q in questions])
  edit_checks.check_edits(stored, forget=facts)
  return facts


def forget(run_dir, fact_id: str | Sequence[str] | None = None,
           question: str | Sequence[str] | None = None, label: str | None = None,
           epochs: int | None = None, progress: bool = False) -> tuple[edit_lib.Edit, registry.Manifest]:
  """Forgets the stored facts with these ids and questions (one or several) in one edit
  (`mome.edit.forget`)."""
  ids, questions = _names(fact_id), _names(question)
  if not ids and not questions:
    raise ValueError("name the facts to forget by --id or --question (each may be repeated)")
  target = open_run(run_dir, label)
  n = _epochs(target, epochs)
  if registry.read_manifest(target.store) is not None:  # a bad id fails before any model loads
    _forgotten(ensure_registry(target)[1], ids, questions)

  def run_edit(ed, table, stored):
    return edit_lib.forget(ed, table, stored, _forgotten(stored, ids, questions), epochs=n,
                           progress=progress)
  return _edit(target, "forget " + _ids([repr(x) for x in ids + questions]), run_edit)


def update(run_dir, answer: str | None = None, fact_id: str | None = None, question: str | None = None,
           label: str | None = None, epochs: int | None = None, progress: bool = False,
           facts_file=None) -> tuple[edit_lib.Edit, registry.Manifest]:
  """New answers in one edit (`mome.edit.update`): `answer` for the stored fact with this id or
  question, or those of a facts file (`load_changes`)."""
  if facts_file is not None:
    if (fact_id, question, answer) != (None, None, None):
      raise ValueError(f"--facts {facts_file} names the facts and their new answers: leave out --id, "
                       "--question and --answer")
    changes, source = edit_checks.load_changes(facts_file), str(facts_file)
  else:
    if (fact_id is None) == (question is None) or answer is None:
      raise ValueError("name the fact by --id or by --question (one of them) with its --answer, or "
                       "give a file of new answers with --facts")
    changes, source = [edit_checks.Change(answer, fact_id, question)], ""
  target = open_run(run_dir, label)
  n = _epochs(target, epochs)
  if registry.read_manifest(target.store) is not None:  # bad input fails before any model loads
    edit_checks.checked_changes(ensure_registry(target)[1], changes, source)

  def run_edit(ed, table, stored):
    checked = edit_checks.checked_changes(stored, changes, source)
    return edit_lib.update(ed, table, stored, checked, epochs=n, progress=progress)
  named = [repr(c.fact_id or c.question) for c in changes]
  return _edit(target, f"update {_ids(named)}" + (f" from {facts_file}" if facts_file else ""), run_edit)


def repair(run_dir, label: str | None = None, epochs: int | None = None, progress: bool = False,
           missed: Sequence[str] | None = None) -> tuple[edit_lib.Edit, registry.Manifest]:
  """Retrains the rows of the stored facts not recalled exactly (`mome.edit.repair`); `missed`:
  their ids, when known."""
  target = open_run(run_dir, label)
  n = _epochs(target, epochs)
  return _edit(target, "repair" + (f" of {_ids(list(missed))}" if missed else ""),
               lambda ed, table, stored: edit_lib.repair(ed, table, stored, epochs=n, progress=progress,
                                                         missed=missed))


# ---------------------------------------------------------------------------------------------
# Reports.


def _ids(ids: Sequence[str]) -> str:
  ids = list(ids)
  return ", ".join(ids[:SHOWN]) + (f", ... ({len(ids)} in all)" if len(ids) > SHOWN else "")


def list_text(facts: Sequence[registry.StoredFact]) -> str:
  near = registry.neighbour_map(facts)
  lines = [f"{len(facts)} facts (id, question -> answer, rows written, collision neighbours)"]
  for f in facts:
    rows = sum(len(r) for r in f.experts.values())
    lines.append(f"{f.id}\t{f.question!r} -> {f.answer!r}\t{rows} rows\t{len(near[f.id])} neighbours")
  return "\n".join(lines)


def show_text(facts: Sequence[registry.StoredFact], fact: registry.StoredFact) -> str:
  lines = [f"id        {fact.id}", f"question  {fact.question!r}", f"answer    {fact.answer!r}",
           f"added     {fact.added}"] + ([f"updated   {fact.updated}"] if fact.updated else [])
  for layer, rows in fact.experts.items():
    shown = " ".join(map(str, rows[:SHOWN])) + (" ..." if len(rows) > SHOWN else "")
    lines.append(f"{layer}: writes {len(rows)} rows: {shown}")
    if fact.reads.get(layer):
      lines.append(f"{layer}: reads {len(fact.reads[layer])} more rows that it does not write")
  near = registry.neighbour_map(facts)[fact.id]
  lines.append(f"neighbours ({len(near)}): "
               + (_ids([f"{k} ({v} shared rows)" for k, v in near.items()]) or "none"))
  return "\n".join(lines)


def edit_text(verb: str, result: edit_lib.Edit, manifest: registry.Manifest) -> str:
  s = result.summary()
  lines = [f"{verb}: version {manifest.version} committed; {s['facts']} facts stored; "
           f"{s['rows_changed']} rows changed ({s['rows_zeroed']} back to untrained)"]
  for t in result.trainings:
    lines.append(f"  trained {t.rows} rows on {len(t.facts)} facts for {t.epochs} epochs "
                 f"({t.seconds:.1f} s): {_ids(t.facts)}")
  if s["checked"]:
    lines.append(f"  recalled exactly: {s['recalled']}/{s['checked']} of the facts it trained or could "
                 "affect" + (f"; NOT recalled: {_ids(s['not_recalled'])}" if s["not_recalled"] else ""))
  else:
    lines.append("  no other stored fact selects the rows it changed")
  if result.removed_recalled is not None:
    still = [k for k, v in result.removed_recalled.items() if v]
    n = len(result.removed_recalled)
    lines.append(f"  removed answers no longer produced: {n - len(still)}/{n}"
                 + (f"; STILL produced: {_ids(still)}" if still else ""))
  return "\n".join(lines)


def _ok(result: edit_lib.Edit) -> bool:
  return all(result.recalled.values()) and not any((result.removed_recalled or {}).values())


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m lamini_jax.facts", description=__doc__.split("\n")[0])
  verbs = parser.add_subparsers(dest="verb", required=True)
  for verb in ("list", "show", "add", "update", "forget", "repair"):
    p = verbs.add_parser(verb)
    p.add_argument("--run-dir", type=pathlib.Path, required=True)
    p.add_argument("--label", help="the MoME model of the run (optional when it holds one)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    if verb in ("show", "update"):
      p.add_argument("--id")
      p.add_argument("--question")
    if verb == "forget":
      p.add_argument("--id", action="append", help="a fact to forget (repeat for several)")
      p.add_argument("--question", action="append", help="a fact to forget (repeat for several)")
    if verb == "add":
      p.add_argument("--facts", type=pathlib.Path, required=True, help="JSONL or CSV of question/answer")
    if verb == "update":
      p.add_argument("--answer", help="the new answer of the fact --id or --question names")
      p.add_argument("--facts", type=pathlib.Path, help="JSONL or CSV of new answers: answer, and id "
                     "or question (instead of --id/--question and --answer)")
    if verb in ("add", "update", "forget", "repair"):
      p.add_argument("--epochs", type=int, help="at most this many epochs per retraining "
                     "(default: the run's mome.train.epochs)")
      p.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  try:
    if args.verb in ("list", "show"):
      _, facts = ensure_registry(open_run(args.run_dir, args.label))
      if args.verb == "list":
        print(json.dumps([f.to_json() for f in facts]) if args.json else list_text(facts))
      else:
        fact = registry.find(facts, args.id, args.question)
        print(json.dumps(fact.to_json()) if args.json else show_text(facts, fact))
      return 0
    progress = not args.no_progress
    if args.verb == "add":
      result, manifest = add(args.run_dir, args.facts, args.label, args.epochs, progress)
    elif args.verb == "repair":
      result, manifest = repair(args.run_dir, args.label, args.epochs, progress)
    elif args.verb == "forget":
      result, manifest = forget(args.run_dir, args.id, args.question, args.label, args.epochs, progress)
    else:
      result, manifest = update(args.run_dir, args.answer, args.id, args.question, args.label,
                                args.epochs, progress, facts_file=args.facts)
  except (yaml_config.ConfigError, FileNotFoundError, KeyError, ValueError, RuntimeError) as e:
    print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
    return 2
  print(json.dumps({"version": manifest.version, **result.summary()}) if args.json
        else edit_text(args.verb, result, manifest))
  return 0 if _ok(result) else 1


if __name__ == "__main__":
  sys.exit(main())
