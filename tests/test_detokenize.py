"""The output text of a Llama-2-style tokenizer (SentencePiece pieces with byte fallback, whose
decoder drops a sequence's leading space and makes every byte of a broken run U+FFFD): read after
the prompt as vLLM's detokenizer reads it, and the same whether a request streams or takes its
output once at the end (OutputProcessor.decode_all)."""

import json
import random

import pytest
from helpers import save_random_hf_model

from caraserve.config import AdapterConfig, EngineConfig
from caraserve.engine import Engine
from caraserve.output_processor import OutputProcessor
from caraserve.request import DETOK_CONTEXT, FinishReason, Request, SamplingParams

CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world and hello there", "中文 字符 and 汉字",
          "def main(): return 0", "numbers 123 456 and more words"]


@pytest.fixture(scope="module")
def llama2_style(tmp_path_factory):
    """(model folder, tokenizer): a byte-fallback BPE with Llama-2's normalizer and decoder over a
    random tiny Llama of its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    raw.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    raw.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                             show_progress=False))
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    # the byte pieces stay in the vocabulary as ordinary tokens, as in Llama-2's (not special ones)
    spec = json.loads(raw.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if not t["content"].startswith("<0x")]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>",
                                  eos_token="</s>", unk_token="<unk>",
                                  clean_up_tokenization_spaces=False)
    folder = tmp_path_factory.mktemp("llama2-style")
    save_random_hf_model(folder, vocab_size=len(tok), bos_token_id=1, eos_token_id=2)
    tok.save_pretrained(str(folder))
    return folder, tok


def byte_ids(tok, data: bytes) -> list[int]:
    return [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in data]


def params(outputs: list[int]) -> SamplingParams:
    """Ends at the last of `outputs`: EOS (id 2) when it is one, else its length."""
    return SamplingParams(max_tokens=len(outputs) + (outputs[-1] == 2), logprobs=True)


def streamed(proc: OutputProcessor, prompt: list[int], outputs: list[int]) -> tuple[str, list[str]]:
    """(text, each token's text) of a streamed request's steps: one token a step, the last ending it."""
    req = Request("s", prompt, params(outputs))
    pieces = []
    for t in outputs:
        req.output_ids.append(t)
        pieces.append(proc.detokenize([req])[0])
    assert "".join(pieces) == req.text and req.output_texts == pieces
    return req.text, pieces


def test_a_final_only_text_is_the_streamed_text_over_broken_byte_runs(llama2_style):
    _, tok = llama2_style
    proc = OutputProcessor(tok, {2}, 4096)
    prompt = tok("hello")["input_ids"]
    # "中" whole, then the first byte of another character cut off by the request's end: decoding
    # the output in one go makes every byte of the run U+FFFD, "中" included; the text is "中" (the
    # broken character left out, as vLLM's detokenizer leaves it)
    forced = byte_ids(tok, "中".encode() + b"\xe6")
    assert tok.decode(forced) == "\ufffd" * 4
    rng = random.Random(0)
    pool = byte_ids(tok, "中文".encode() + b"\xe6\x80") + tok("hello world", add_special_tokens=False)["input_ids"]
    cases = [forced] + [[rng.choice(pool) for _ in range(rng.randint(1, 8))] + [2] * (k % 2) for k in range(200)]
    for outputs in cases:
        text, pieces = streamed(proc, prompt, outputs)
        req = Request("f", prompt, params(outputs), final_only=True)
        req.output_ids = list(outputs)
        proc.decode_all(req, proc.end_reason(req))
        assert (req.text, req.output_texts) == (text, pieces), outputs
    req = Request("f", prompt, SamplingParams(max_tokens=4, ignore_eos=True), final_only=True)
    req.output_ids = forced
    proc.decode_all(req, FinishReason.LENGTH)
    assert req.text == "中"


def test_the_output_keeps_the_leading_space_its_first_token_decodes_with(llama2_style):
    """As vLLM's: the first output token is read after the prompt's last tokens, so " world"
    after "hello" keeps its space (decoded alone, a SentencePiece decoder drops it)."""
    folder, tok = llama2_style
    spaced = sorted(i for t, i in tok.get_vocab().items() if t.startswith("\u2581") and len(t) > 1)
    engine = Engine(EngineConfig(model=str(folder), compile="false", adapters=AdapterConfig(dir="none")))
    prompt = "hello there"
    params = SamplingParams(max_tokens=6, temperature=0, allowed_token_ids=spaced)
    final = engine.generate([prompt], params)[0]
    streamed = "".join(out.new_text for out in engine.stream(prompt, params))
    ids = tok(prompt)["input_ids"]
    context = tok.decode(ids[-DETOK_CONTEXT:], skip_special_tokens=True)
    expected = tok.decode(ids[-DETOK_CONTEXT:] + final.output_ids, skip_special_tokens=True)[len(context):]
    assert expected.startswith(" ") and not tok.decode(final.output_ids).startswith(" ")
    assert final.text == streamed == expected


class CleaningUp:
    """A tokenizer asking for transformers' space clean-up (clean_up_tokenization_spaces, as Llama
    3's does), which transformers 4 applies in decode unless told not to: " ," read as ","."""

    clean_up_tokenization_spaces = True

    def __init__(self, tok):
        self.tok, self.backend_tokenizer = tok, tok.backend_tokenizer

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=None):
        text = self.tok.decode(ids, skip_special_tokens=skip_special_tokens)
        return text if clean_up_tokenization_spaces is False else text.replace(" ,", ",")

    def batch_decode(self, windows, skip_special_tokens=False, clean_up_tokenization_spaces=None):
        return [self.decode(w, skip_special_tokens, clean_up_tokenization_spaces) for w in windows]


def test_texts_never_get_transformers_space_clean_up(llama2_style):
    """As vLLM's detokenizer: the decoder's text as it is, whatever the tokenizer's config asks."""
    from caraserve.serve.choices import TokenTexts

    _, tok = llama2_style
    ids = tok("hello , world", add_special_tokens=False)["input_ids"]
    cleaning = CleaningUp(tok)
    assert cleaning.decode(ids) == "hello, world"
    assert OutputProcessor(cleaning, {2}, 4096)._decode_batch([ids], [True]) == ["hello , world"]
    assert "".join(TokenTexts(cleaning)(ids, before=[1], at=1)) == "hello , world"


@pytest.mark.parametrize("run", ["broken bytes", "special tokens"])
def test_a_long_run_of_tokens_without_text_keeps_the_window_short(llama2_style, run):
    """Broken bytes (lone continuation bytes) or special tokens (they read as nothing) for
    hundreds of tokens: each token's window stays within HELD_TOKENS tokens of held-back text
    (it would grow with the run, and so would every step's decode and a final-only replay), and
    the text is the same streamed and final-only."""
    from caraserve.output_processor import HELD_TOKENS

    _, tok = llama2_style
    proc = OutputProcessor(tok, {2}, 4096)
    prompt = tok("hello")["input_ids"]
    token = byte_ids(tok, b"\x80")[0] if run == "broken bytes" else 1  # <s>
    outputs = [token] * 300 + tok("done", add_special_tokens=False)["input_ids"]
    req = Request("s", prompt, params(outputs))
    for t in outputs:
        req.output_ids.append(t)
        proc.detokenize([req])
        assert len(req.prompt_ids) + len(req.output_ids) - req.detok_read <= HELD_TOKENS
    assert req.text.endswith("done") and set(req.text.removesuffix("done").strip()) <= {"\ufffd"}
    final = Request("f", prompt, params(outputs), final_only=True)
    final.output_ids = list(outputs)
    proc.decode_all(final, proc.end_reason(final))
    assert (final.text, final.output_texts) == (req.text, req.output_texts)
