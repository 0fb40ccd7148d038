"""Shared fixtures for unit tests: a tiny randomly initialised Llama, in memory and as safetensors."""

import pytest

from tiny_models import tiny_model


@pytest.fixture(scope="session")
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_llama_folder(tiny_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama.save_pretrained(folder)
    return folder
