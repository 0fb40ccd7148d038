"""Real models from the asset cache (`nsds assets fetch`), loaded once per test session."""

import pytest
import torch

from nsds import assets
from nsds.errors import NsdsError

from needs import missing


def asset_or_skip(name: str):
    try:
        return assets.path(name)
    except NsdsError as err:
        missing(f"real-model test needs an asset: {err}")


def load_transformers(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_gguf():
    return asset_or_skip("smollm2")


@pytest.fixture(scope="session")
def gemma3_gguf():
    return asset_or_skip("gemma3-270m")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
    return load_transformers(smollm2_gguf)


@pytest.fixture(scope="session")
def gemma3_hf(gemma3_gguf):
    return load_transformers(gemma3_gguf)
