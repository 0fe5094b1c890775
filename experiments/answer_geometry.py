"""Can a MoME layer's input tell questions apart where the answer starts?

  python -m experiments.answer_geometry
  python -m experiments.answer_geometry --set mome.layers=[1,2,3,4] --positions 0

For each MoME layer of the run config (the backbone's own hidden states: every
expert adds 0 here), at answer positions j (j = 0 is the last prompt token,
which picks the first answer token; its input has seen the question only), it
compares the inputs of the trained facts (random answers), the held-out
TruthfulQA questions and the spare ones (the anchors' questions), each with its
best answer. Two features: the token's input x_t, and the causal mean of the
layer's inputs over positions 0..t. Per layer, position and feature it prints:

- |mean| and rms dev: the norm of the mean over facts and spare questions, and
  the root-mean-square distance of the facts from it;
- PR: participation ratio of the deviations' covariance (effective dimensions);
- NN f>f, NN h>f: mean distance from a fact to its nearest other fact, and from
  a held-out question to its nearest fact;
- fires: the share of (held-out question, fact) pairs where a key built from
  the fact's input alone, as `mome.table.key_rows` builds it, fires on the held-out
  input (projection >= `mome.key_match` of the key's length); "centered": the
  same with the mean above subtracted from every input first.

If NN h>f is about NN f>f and keys fire on most held-out inputs, no expert keyed
on that feature can write a fact's random answer there without moving held-out
answers too (README: "Why the first answer tokens").
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lamini_jax.data import encoding
from lamini_jax.data import facts as facts_lib
from lamini_jax.mome import inputs as inputs_lib
from lamini_jax.mome import tuning as mome_tuning
from lamini_jax import runs

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "randomization_cpu.yaml"
FEATURES = ("token", "causal mean")
_layer_inputs = jax.jit(inputs_lib.layer_inputs, static_argnums=0)


@dataclasses.dataclass(frozen=True)
class Geometry:
  mean_norm: float
  rms_dev: float
  participation_ratio: float
  nn_fact_fact: float
  nn_heldout_fact: float
  fires: float
  fires_centered: float


def _nearest(query_QxD: np.ndarray, ref_RxD: np.ndarray, exclude_self: bool) -> np.ndarray:
  d2_QxR = np.sum((query_QxD[:, None] - ref_RxD[None]) ** 2, axis=-1)
  if exclude_self:
    np.fill_diagonal(d2_QxR, np.inf)
  return np.sqrt(d2_QxR.min(axis=1))


def _fires(heldout_HxD: np.ndarray, facts_FxD: np.ndarray, match: float) -> float:
  # The key of fact f is m_f / |m_f|^2: it fires on x where x . m_f / |m_f|^2 >= match.
  proj_HxF = heldout_HxD @ facts_FxD.T / np.sum(facts_FxD**2, axis=1)[None]
  return float(np.mean(proj_HxF >= match))


def geometry(facts_FxD: np.ndarray, heldout_HxD: np.ndarray, spare_SxD: np.ndarray,
             match: float) -> Geometry:
  """The figures of the module docstring for one feature (float64 throughout)."""
  f, h, s = (np.asarray(a, np.float64) for a in (facts_FxD, heldout_HxD, spare_SxD))
  mean_D = np.concatenate([f, s]).mean(axis=0)
  dev_f, dev_h = f - mean_D, h - mean_D
  ev = np.linalg.eigvalsh(np.cov(np.concatenate([dev_f, s - mean_D]).T))
  return Geometry(
      mean_norm=float(np.linalg.norm(mean_D)),
      rms_dev=float(np.sqrt(np.mean(np.sum(dev_f**2, axis=1)))),
      participation_ratio=float(ev.sum()**2 / np.sum(ev**2)),
      nn_fact_fact=float(_nearest(f, f, True).mean()),
      nn_heldout_fact=float(_nearest(h, f, False).mean()),
      fires=_fires(h, f, match),
      fires_centered=_fires(dev_h, dev_f, match))


def answer_features(model, variables, encoded: Sequence[encoding.EncodedFact],
                    positions: Sequence[int], batch_size: int = 32) -> dict[str, dict]:
  """{layer: {(feature, j): [F, D]}}: each layer's input at answer position j of every fact."""
  tokens_FxT, pred_FxT = inputs_lib.answer_positions(encoded)
  first_F = pred_FxT.argmax(axis=1)
  out: dict[str, dict] = {}
  for start in range(0, len(encoded), batch_size):
    block = tokens_FxT[start:start + batch_size]
    n = len(block)
    x = _layer_inputs(model, variables, jnp.asarray(np.pad(block, ((0, batch_size - n), (0, 0)))))
    for name, x_BxTxD in x.items():
      x_BxTxD = np.asarray(x_BxTxD, np.float64)[:n]
      mean_BxTxD = np.cumsum(x_BxTxD, axis=1) / np.arange(1, x_BxTxD.shape[1] + 1)[None, :, None]
      for j in positions:
        t_B = first_F[start:start + n] + j
        for feature, a in zip(FEATURES, (x_BxTxD, mean_BxTxD)):
          out.setdefault(name, {}).setdefault((feature, j), []).append(a[np.arange(n), t_B])
  return {name: {k: np.concatenate(v) for k, v in d.items()} for name, d in out.items()}


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.answer_geometry",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--config", type=pathlib.Path, default=DEFAULT_CONFIG,
                      help="run config (default configs/randomization_cpu.yaml)")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override a config field, e.g. --set mome.layers=[1,2,3,4]")
  parser.add_argument("--positions", default="0,1", help="answer positions j, comma-separated")
  args = parser.parse_args(argv)
  positions = [int(p) for p in args.positions.split(",")]
  if min(positions) < 0:
    parser.error(f"--positions {args.positions}: positions must be >= 0")
  cfg = runs.load_run_config(args.config, args.set)
  spec = cfg.mome
  backbone = runs.load_backbone(cfg.model)
  model_cfg, params, tokenizer = backbone.cfg, backbone.params, backbone.tokenizer
  template = runs.prompt_template(cfg.data)
  facts, held, _ = runs.facts_and_heldout(cfg.data, "random")
  held_facts = [facts_lib.Fact(i.question, i.best_answer, f"heldout-{k}") for k, i in enumerate(held)]
  spare = runs.spare_truthfulqa(cfg.data, len(facts))
  spare_facts = [facts_lib.Fact(i.question, i.best_answer, f"spare-{k}") for k, i in enumerate(spare)]
  # The inputs do not depend on the table while every expert adds 0: a small one will do.
  small = dataclasses.replace(spec, layer=dataclasses.replace(spec.layer, num_experts=1024))
  model = mome_tuning.mome_model(model_cfg, small)
  variables = {"params": params, **mome_tuning.init_mome(model, small.seed, zero_down=True)}
  feats = [answer_features(model, variables, encoding.encode_facts(tokenizer, template, fs, cfg.data.max_len),
                           positions) for fs in (facts, held_facts, spare_facts)]
  match = spec.key_match or 0.8
  print(f"{len(facts)} facts (random answers), {len(held)} held-out and {len(spare)} spare questions;"
        f" keys fire at projection >= {match}")
  print("| layer | j | feature | mean | rms dev | PR | NN f>f | NN h>f | fires | centered |")
  print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  for name in feats[0]:
    for j in positions:
      for feature in FEATURES:
        g = geometry(*(fe[name][(feature, j)] for fe in feats), match)
        print(f"| {name} | {j} | {feature} | {g.mean_norm:.2f} | {g.rms_dev:.2f} |"
              f" {g.participation_ratio:.1f} | {g.nn_fact_fact:.2f} | {g.nn_heldout_fact:.2f} |"
              f" {g.fires:.3f} | {g.fires_centered:.4f} |")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
