"""Perplexity against a hand computation, and the token-window protocol (BOS prefix, errors)."""

import math

import pytest
import torch
from transformers import AutoTokenizer

from nsds.errors import NsdsError
from nsds.evaluate.perplexity import perplexity
from nsds.evaluate.text import load_text, token_windows

from tiny_models import save_tiny_tokenizer, tiny_model


def test_perplexity_by_hand():
    model = tiny_model("llama")
    torch.manual_seed(1)
    windows = torch.randint(0, 96, (3, 9))
    nll, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            logits = model(input_ids=window[None]).logits[0]
            for t in range(1, len(window)):
                probs = torch.softmax(logits[t - 1].double(), dim=-1)
                nll -= math.log(float(probs[window[t]]))
                count += 1
    assert perplexity(model, windows) == pytest.approx(math.exp(nll / count), rel=1e-5)


@pytest.mark.parametrize("add_bos", [False, True])
def test_token_windows(tmp_path, add_bos):
    save_tiny_tokenizer(tmp_path, add_bos=add_bos)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    text = "The quick brown fox jumps over the lazy dog. " * 40
    windows, protocol = token_windows(tokenizer, text, "fox", window=16, tokens=60)
    assert windows.shape == (4, 16) and protocol.windows == 4 and protocol.scored_tokens == 60
    assert protocol.bos_prefix == add_bos
    assert bool((windows[:, 0] == tokenizer.bos_token_id).all()) == add_bos
    ids = tokenizer(text, add_special_tokens=False).input_ids
    body = windows[:, 1:] if add_bos else windows
    assert body.flatten().tolist() == ids[: body.numel()]  # consecutive, non-overlapping
    assert "4 non-overlapping windows of 16 tokens" in protocol.describe()


def test_text_errors(tmp_path):
    save_tiny_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    with pytest.raises(NsdsError, match="fewer than one window"):
        token_windows(tokenizer, "The fox.", "short", window=512, tokens=1000)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(NsdsError, match="is empty"):
        load_text(str(empty))
    with pytest.raises(NsdsError, match=r"no text 'nope\.txt'"):
        load_text("nope.txt")
