"""prompt_logprobs' decoded tokens where the main tests do not reach:
a prompt of token ids that begins inside a character (byte tokens) reads each token as echo
reads it, the window of CONTEXT tokens before the token included."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from caraserve.model.tiny import tiny_paths
from caraserve.request import FinishReason, RequestOutput
from caraserve.serve.choices import TokenTexts
from caraserve.serve.prompt_logprobs import entries


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(tiny_paths()[0]))


@pytest.mark.parametrize("ids", [
    [251, 110, 136, 131, 1162, 580, 2568],  # 4 byte tokens (no whole character), then words
    [180, 227, 252, 145, 2568, 9, 300],
    [236, 165, 126, 190, 1435],
    [1, 232, 144, 191, 134, 115, 200],
])
def test_each_prompt_tokens_text_is_the_one_echo_gives(tok, ids):
    texts = TokenTexts(tok)
    assert any("\ufffd" in tok.decode([t]) for t in ids[:4])  # (the case: a prompt opening on byte tokens)
    scored = [None] + [(-1.0, ((5, -0.5),), 3) for _ in ids[1:]]
    out = RequestOutput("r", [7], [7], True, FinishReason.LENGTH, prompt_logprobs=scored)
    got = entries(texts, ids, out, 1)
    echoed = TokenTexts(tok)(ids)  # what echo's tokens read (the sequence from its start)
    assert got[0] is None
    for p in range(1, len(ids)):
        assert got[p][str(ids[p])]["decoded_token"] == echoed[p], p
        assert got[p][str(ids[p])]["rank"] == 3 and got[p]["5"]["rank"] == 1
