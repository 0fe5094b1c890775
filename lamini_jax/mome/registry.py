"""The fact registry of a MoME model and the committed state of its edited memory.

Inside a MoME label's store (`runs.RunDir.paths(label).store`, i.e. RUN/mome/LABEL):

  memory.json              the manifest: the current version, the training checkpoint
                           step it builds on, and the files below that hold it
  memory/facts-<v>.jsonl   version v's registry: one line per stored fact
  memory/rows-<v>.npz      version v's expert rows that differ from that checkpoint

A registry line is {"id", "question", "answer", "added" (ISO time), "experts":
{layer: sorted rows the fact writes}}, with "reads" ({layer: rows its answer
positions select in the slots they do not write, when `mome.train_slots` < K}),
"slots" ({layer: the slots each answer position writes, in order}, with a
`mome.train_slot_choice` other than "first") and "updated" (ISO time) when there are any. Version v is committed by one
`os.replace` of the manifest after its files are written and synced, so a process
killed at any point leaves the previous version or v, never a mix (`commit`);
`clean` removes the files of older versions and of commits that never happened.
Everything here is host-side (json and numpy), without JAX.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import pathlib
import signal
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from lamini_jax.data import facts as facts_lib

MANIFEST = "memory.json"
MEMORY_DIR = "memory"
LOCK = "memory.lock"
KILL_ENV = "LAMINI_JAX_FACTS_KILL_AT"  # tests: SIGKILL this process at a named stage of `commit`
STAGES = ("rows", "registry", "manifest")  # after each file of `commit` is in place

Rows = dict[str, dict[str, np.ndarray]]  # layer -> {"rows": [M], "down": [M, D, R], "up": [M, R, D]}


def now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass(frozen=True)
class StoredFact:
  """One fact of the registry: the expert rows it writes (and reads) in each MoME layer."""

  id: str
  question: str
  answer: str
  added: str
  experts: dict[str, tuple[int, ...]]
  reads: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
  updated: str | None = None
  slots: dict[str, tuple[tuple[int, ...], ...]] = dataclasses.field(default_factory=dict)

  def fact(self) -> facts_lib.Fact:
    """The question and answer, as training and recall take them."""
    return facts_lib.Fact(self.question, self.answer, self.id)

  def rows(self, layer: str) -> np.ndarray:
    """Every row of `layer` that the fact's answer positions select: written or read."""
    return np.union1d(self.experts.get(layer, ()), self.reads.get(layer, ())).astype(np.int64)

  def to_json(self) -> dict[str, Any]:
    out: dict[str, Any] = {"id": self.id, "question": self.question, "answer": self.answer,
                           "added": self.added, "experts": {k: list(v) for k, v in self.experts.items()}}
    if any(self.reads.values()):
      out["reads"] = {k: list(v) for k, v in self.reads.items()}
    if self.updated is not None:
      out["updated"] = self.updated
    if self.slots:
      out["slots"] = {k: [list(p) for p in v] for k, v in self.slots.items()}
    return out

  @classmethod
  def from_json(cls, record: dict[str, Any], where: str) -> "StoredFact":
    missing = [k for k in ("id", "question", "answer", "added", "experts") if k not in record]
    if missing:
      raise ValueError(f"{where}: a registry line lacks {missing}")
    rows = lambda m: {k: tuple(int(r) for r in v) for k, v in (m or {}).items()}
    slots = {k: tuple(tuple(int(s) for s in p) for p in v) for k, v in (record.get("slots") or {}).items()}
    return cls(str(record["id"]), record["question"], record["answer"], record["added"],
               rows(record["experts"]), rows(record.get("reads")), record.get("updated"), slots)


def registry_text(facts: Sequence[StoredFact]) -> str:
  return "".join(json.dumps(f.to_json(), ensure_ascii=False) + "\n" for f in facts)


def read_registry(path: pathlib.Path) -> list[StoredFact]:
  facts = []
  for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
    if line.strip():
      facts.append(StoredFact.from_json(json.loads(line), f"{path}: line {n}"))
  return facts


def find(facts: Sequence[StoredFact], fact_id: str | None = None,
         question: str | None = None) -> StoredFact:
  """The stored fact with this id or question (exactly one of them); an error names what is not there."""
  if (fact_id is None) == (question is None):
    raise ValueError("name the fact by --id or by --question (one of them)")
  key, value = ("id", fact_id) if fact_id is not None else ("question", question.strip())
  for f in facts:
    if getattr(f, key) == value:
      return f
  raise KeyError(f"no stored fact has {key} {value!r} (`python -m lamini_jax.facts list` shows the "
                 f"{len(facts)} stored facts)")


def neighbours(facts: Sequence[StoredFact], rows: dict[str, np.ndarray],
               exclude: Sequence[str] = ()) -> list[StoredFact]:
  """The stored facts (but `exclude`d ids) whose answer positions select any of `rows` in some layer.

  Those are the facts whose recall a change of these rows can alter: the ones that
  write them (collision neighbours) and, with `train_slots`, the ones that read them.
  """
  skip = set(exclude)
  wanted = {layer: set(np.asarray(r, np.int64).tolist()) for layer, r in rows.items()}
  return [f for f in facts if f.id not in skip and any(  # set lookups: linear in the rows stored
      not w.isdisjoint(f.experts.get(layer, ())) or not w.isdisjoint(f.reads.get(layer, ()))
      for layer, w in wanted.items())]


def neighbour_map(facts: Sequence[StoredFact]) -> dict[str, dict[str, int]]:
  """Every fact's neighbours with the number of rows it shares with each (of the rows either
  selects), from one index of rows to facts: time linear in the rows stored."""
  users: dict[tuple[str, int], list[str]] = {}
  for f in facts:
    for layer in set(f.experts) | set(f.reads):
      for row in f.rows(layer).tolist():
        users.setdefault((layer, row), []).append(f.id)
  out: dict[str, dict[str, int]] = {f.id: {} for f in facts}
  for ids in users.values():
    for a in ids:
      for b in ids:
        if a != b:
          out[a][b] = out[a].get(b, 0) + 1
  return out


# ---------------------------------------------------------------------------------------------
# The committed state.


@dataclasses.dataclass(frozen=True)
class Manifest:
  """Which files hold the current version of a label's memory (`MANIFEST`)."""

  version: int
  base_step: int  # the training checkpoint (RUN/checkpoints/LABEL) the rows apply to
  registry: str  # relative to the store
  rows: str | None  # relative to the store; None: the checkpoint's table as trained
  updated: str
  operation: str

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def read_manifest(store: pathlib.Path) -> Manifest | None:
  """The committed manifest of a store, or None when the memory was never edited nor listed."""
  path = pathlib.Path(store) / MANIFEST
  if not path.is_file():
    return None
  try:
    values = json.loads(path.read_text())
    manifest = Manifest(**values)
  except (json.JSONDecodeError, TypeError) as e:
    raise ValueError(f"{path}: not a memory manifest ({e})") from None
  for name in (manifest.registry, manifest.rows):
    if name is not None and not (path.parent / name).is_file():
      raise FileNotFoundError(f"{path} names {name}, which is missing")
  return manifest


def load_facts(store: pathlib.Path, manifest: Manifest) -> list[StoredFact]:
  return read_registry(pathlib.Path(store) / manifest.registry)


def load_rows(store: pathlib.Path, manifest: Manifest) -> Rows:
  """The rows version `manifest` changed, by layer (empty when none)."""
  if manifest.rows is None:
    return {}
  out: Rows = {}
  with np.load(pathlib.Path(store) / manifest.rows) as data:
    for name in data.files:
      layer, leaf = name.rsplit(".", 1)
      out.setdefault(layer.replace(".", "/"), {})[leaf] = data[name]
  return out


def _stage(name: str) -> None:
  if os.environ.get(KILL_ENV) == name:
    os.kill(os.getpid(), signal.SIGKILL)


def _write(path: pathlib.Path, write) -> None:
  """Writes through a temporary file, synced, then renamed into place."""
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _sync_dir(path: pathlib.Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def commit(store: pathlib.Path, version: int, base_step: int, facts: Sequence[StoredFact],
           rows: Rows, operation: str) -> Manifest:
  """Makes `version` the current state: its registry, its changed rows, then the manifest.

  Until the manifest is replaced, readers see the previous version; after it, this one.
  """
  store = pathlib.Path(store)
  folder = store / MEMORY_DIR
  folder.mkdir(parents=True, exist_ok=True)
  rows_name = None
  if rows:
    rows_name = f"{MEMORY_DIR}/rows-{version:06d}.npz"
    arrays = {f"{layer.replace('/', '.')}.{leaf}": np.asarray(a)
              for layer, leaves in rows.items() for leaf, a in leaves.items()}
    _write(store / rows_name, lambda f: np.savez(f, **arrays))
  _stage("rows")
  registry_name = f"{MEMORY_DIR}/facts-{version:06d}.jsonl"
  _write(store / registry_name, lambda f: f.write(registry_text(facts).encode("utf-8")))
  _sync_dir(folder)
  _stage("registry")
  manifest = Manifest(version, base_step, registry_name, rows_name, now(), operation)
  _write(store / MANIFEST, lambda f: f.write((json.dumps(manifest.to_json(), indent=2) + "\n").encode()))
  _sync_dir(store)
  _stage("manifest")
  clean(store)
  return manifest


def _version(name: str) -> int | None:
  """The version of a file of `MEMORY_DIR` ("facts-000003.jsonl" -> 3); None for any other name."""
  stem = name.split(".", 1)[0]
  kind, _, number = stem.partition("-")
  return int(number) if kind in ("facts", "rows") and number.isdigit() and "." in name else None


def clean(store: pathlib.Path) -> None:
  """Removes the files of versions before the previous one and of commits that never happened.

  The previous version's files stay, so that a reader that read the manifest just before a
  commit can still read the files it names.
  """
  store = pathlib.Path(store)
  folder = store / MEMORY_DIR
  if folder.is_dir():
    manifest = read_manifest(store)
    current = -1 if manifest is None else manifest.version
    for path in folder.iterdir():
      if path.name.endswith(".tmp") or _version(path.name) not in (current, current - 1):
        path.unlink()
  (store / (MANIFEST + ".tmp")).unlink(missing_ok=True)


@contextlib.contextmanager
def locked(store: pathlib.Path) -> Iterator[None]:
  """Holds the store's edit lock: one edit of a label's memory at a time."""
  store = pathlib.Path(store)
  store.mkdir(parents=True, exist_ok=True)
  with open(store / LOCK, "a") as f:
    try:
      fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise RuntimeError(f"{store}: another process is editing this memory ({store / LOCK} is held)"
                         ) from None
    try:
      yield
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)
