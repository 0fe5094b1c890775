"""experiments.answer_geometry: its figures on hand-worked points, its features against fact_inputs."""

import jax
import numpy as np
import pytest

from experiments import answer_geometry as ag
from lamini_jax.config import ModelConfig
from lamini_jax.data import encoding
from lamini_jax import model as model_lib
from lamini_jax.mome import config as mome_config
from lamini_jax.mome import inputs as inputs_lib
from lamini_jax.mome import layer as layer_lib
from lamini_jax.mome import sparse_optim
from lamini_jax.mome import tuning as mome_tuning


def test_geometry_hand_worked():
  # Facts (+-1, 0) and spare (0, +-2) in the first two axes, everything shifted by 5 along z.
  z = np.array([0.0, 0.0, 5.0])
  facts = np.array([[1.0, 0, 0], [-1, 0, 0]]) + z
  spare = np.array([[0.0, 2, 0], [0, -2, 0]]) + z
  heldout = np.array([[0.9, 0, 0], [0, 0, 1]]) + z
  g = ag.geometry(facts, heldout, spare, match=0.8)
  assert g.mean_norm == pytest.approx(5.0, rel=1e-12)
  assert g.rms_dev == pytest.approx(1.0, rel=1e-12)
  # Covariance (ddof 1) of the four deviations: diag(2/3, 8/3, 0).
  assert g.participation_ratio == pytest.approx((10 / 3) ** 2 / (68 / 9), rel=1e-12)
  assert g.nn_fact_fact == pytest.approx(2.0, rel=1e-12)
  assert g.nn_heldout_fact == pytest.approx((0.1 + np.sqrt(2.0)) / 2, rel=1e-12)
  # Uncentered, the shared z makes every key fire on every held-out input: (25 +- 0.9) / 26 and
  # 30 / 26 are all >= 0.8. Centered, only (0.9, 0, 0) on the key of (1, 0, 0) fires.
  assert g.fires == 1.0
  assert g.fires_centered == 0.25


@pytest.mark.slow  # about 20 s: two compilations of a tiny MoME model
def test_answer_features_match_fact_inputs():
  cfg = ModelConfig(vocab_size=67, hidden_size=22, intermediate_size=37, num_layers=3, num_heads=4,
                    num_kv_heads=2, head_dim=6, max_position_embeddings=64, tie_word_embeddings=True)
  spec = mome_config.MomeTuningConfig(layers=(1, 2), layer=mome_config.MomeConfig(
      num_experts=2**8, num_heads=2, key_dim=8, top_k=3),
                              balance=False, generalization=mome_config.GeneralizationConfig(epochs=0))
  model = mome_tuning.mome_model(cfg, spec)
  variables = jax.jit(lambda k: model_lib.init_variables(model, k))(jax.random.key(0))
  # Every expert adds 0 (up = 0): the inputs are the backbone's, as in the experiment.
  assert not any(np.any(np.asarray(up))
                 for up in jax.tree.leaves(sparse_optim.map_layers(lambda t: t["up"], variables[layer_lib.TABLE])))
  rng = np.random.default_rng(5)
  encoded = []
  for n in rng.integers(9, 16, size=5):
    tokens = rng.integers(3, cfg.vocab_size, size=n).astype(np.int32)
    encoded.append(encoding.EncodedFact(tokens, np.arange(n) >= n - 4))
  feats = ag.answer_features(model, variables, encoded, positions=(0, 2), batch_size=3)
  x, fact_P = inputs_lib.fact_inputs(model, variables, encoded, batch_size=3)
  first_P = np.r_[True, fact_P[1:] != fact_P[:-1]]  # each fact's first answer position
  for name in ("layers_1/mome", "layers_2/mome"):
    np.testing.assert_allclose(feats[name][("token", 0)], x[name][first_P], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(feats[name][("token", 2)], x[name][np.nonzero(first_P)[0] + 2],
                               rtol=1e-6, atol=1e-6)
  # The causal mean at position t against the layer's inputs over 0..t.
  tokens, pred = inputs_lib.answer_positions(encoded)
  xs = np.concatenate([np.asarray(ag._layer_inputs(model, variables, tokens[s:s + 3])["layers_2/mome"])
                       for s in (0, 2)])[[0, 1, 2, 4, 5]]
  for f in range(len(encoded)):
    t = int(pred[f].argmax()) + 2
    np.testing.assert_allclose(feats["layers_2/mome"][("causal mean", 2)][f],
                               xs[f, :t + 1].mean(axis=0), rtol=1e-5, atol=1e-6)
