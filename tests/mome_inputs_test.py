"""`mome.inputs.answer_routes`: a MoME layer's inputs and routes at the facts' answer positions,
against `fact_inputs` and `route_jit` on a tiny random model, with and without its cache."""

import jax
import numpy as np

from lamini_jax.config import ModelConfig
from lamini_jax.data import encoding
from lamini_jax import model as model_lib
from lamini_jax.mome import config as mome_config
from lamini_jax.mome import inputs as inputs_lib
from lamini_jax.mome import layer as layer_lib
from lamini_jax.mome import router as router_lib
from lamini_jax.mome import tuning as mome_tuning


def test_answer_routes_are_each_facts_routes_whatever_the_cache_holds():
  cfg = ModelConfig(vocab_size=67, hidden_size=22, intermediate_size=37, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=6, max_position_embeddings=64, tie_word_embeddings=True)
  layer = mome_config.MomeConfig(num_experts=2**8, num_heads=2, key_dim=8, top_k=3)
  spec = mome_config.MomeTuningConfig(layers=(1,), layer=layer,
                                      generalization=mome_config.GeneralizationConfig(epochs=0))
  model = mome_tuning.mome_model(cfg, spec)
  variables = jax.jit(lambda k: model_lib.init_variables(model, k))(jax.random.key(1))
  path = inputs_lib.layer_paths(model)[0]
  rng = np.random.default_rng(7)
  encoded = []
  for n in rng.integers(9, 16, size=5):
    tokens = rng.integers(3, cfg.vocab_size, size=n).astype(np.int32)
    encoded.append(encoding.EncodedFact(tokens, np.arange(n) >= n - rng.integers(2, 5)))
  x, fact_P = inputs_lib.fact_inputs(model, variables, encoded)
  idx, w = router_lib.route_jit(inputs_lib.tree_get(variables[layer_lib.ROUTER], path),
                                x["layers_1/mome"], model.mome,
                                inputs_lib.tree_get(variables[layer_lib.BALANCE], path))
  want = (x["layers_1/mome"], np.asarray(idx), np.asarray(w), fact_P)
  cache = {}
  # Facts 3 and 1 first (cached alone), then all five in another order and twice over.
  inputs_lib.answer_routes(model, variables, path, [encoded[3], encoded[1]], cache)
  assert len(cache) == 2
  order = [4, 1, 0, 3, 2, 1]
  got = inputs_lib.answer_routes(model, variables, path, [encoded[i] for i in order], cache)
  assert len(cache) == 5
  rows = np.concatenate([np.flatnonzero(fact_P == i) for i in order])
  counts = [np.sum(fact_P == i) for i in order]
  np.testing.assert_array_equal(got[3], np.repeat(np.arange(len(order)), counts))
  np.testing.assert_allclose(got[0], want[0][rows], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got[1], want[1][rows])
  np.testing.assert_allclose(got[2], want[2][rows], rtol=1e-5, atol=1e-6)
