"""Shared fixtures: devices, seeded generators, and one loaded default model per session."""
from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA GPU"))]


@pytest.fixture
def gen():
    """A fresh, test-specific seeded generator (seed from the test's name, so inputs differ per test)."""
    seed = abs(hash(os.environ.get("PYTEST_CURRENT_TEST", ""))) % (2**31)
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def default_model():
    """SmolLM2-135M-Instruct loaded once for the whole session (skipped if the package is missing)."""
    from spd.models import ALIASES, DEFAULT_MODEL, load

    source = ALIASES[DEFAULT_MODEL]
    if not source.installed():
        pytest.skip(f"default model not installed: `{source.install_command}`")
    return load(DEFAULT_MODEL, device="cpu")


def save_tiny_llama(path, tokenizer, **overrides):
    """A tiny random-weight Llama (seed 0) saved with ``tokenizer`` (the default model's: its chat
    template) into ``path``; ``overrides`` change the LlamaConfig (e.g. num_hidden_layers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=12, pad_token_id=tokenizer.pad_token_id,
               eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    cfg.update(overrides)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
