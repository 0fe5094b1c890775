"""Shared fixtures. Eight simulated CPU devices so sharding tests see a real mesh."""

import os

# Must run before jax is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STORIES = SHARED / "models" / "stories260K-hf"


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
  if not SHARED.is_dir():
    raise FileNotFoundError(f"tests need the shared material at {SHARED} (see README)")
  return SHARED


@pytest.fixture(scope="session")
def stories_dir(shared_dir) -> pathlib.Path:
  return STORIES


@pytest.fixture(scope="session")
def stories_tokenizer(stories_dir):
  import transformers
  return transformers.AutoTokenizer.from_pretrained(stories_dir)


@pytest.fixture(scope="session")
def stories(stories_dir):
  """(config, params) of the shared pretrained stories260K model, loaded once."""
  from lamini_jax import hf
  cfg, params, _ = hf.load_pretrained(stories_dir)
  return cfg, params


@pytest.fixture(scope="session")
def stories_torch(stories_dir):
  transformers = pytest.importorskip("transformers")
  return transformers.AutoModelForCausalLM.from_pretrained(stories_dir).eval()
