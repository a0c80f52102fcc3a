"""Token counts (OpenAI's real encodings offline, the fast encoder against tiktoken, the chat template for
local), epochs, cost, budget, and the path for an encoding no installed package ships."""

import hashlib
import logging
import random
import unicodedata

import pytest

from conftest import DEMO_CONFIG, ROOT
from tuneloop.core.config import OpenAITrainConfig, load_config
from tuneloop.core.records import TuneloopError
from tuneloop.lib import tokens
from tuneloop.lib.tokens import (
    ChatTemplateCounter,
    QuicktokCounter,
    TiktokenCounter,
    encoding_for_model,
    enforce_budget,
    estimate_cost,
    openai_counter,
    resolve_epochs,
    token_stats,
)

# Token ids published for these encodings (tiktoken's and OpenAI's tokenizer pages): the real ones, not a lookalike.
HELLO = {"o200k_base": [13225, 11, 2375, 0], "cl100k_base": [9906, 11, 1917, 0]}
MODELS = {"o200k_base": "gpt-4o-mini-2024-07-18", "cl100k_base": "gpt-3.5-turbo-0125"}


def recipe_count(encoding, messages):
    """OpenAI's chat recipe, as published: the reference our counts must equal."""
    n = 0
    for message in messages:
        n += 3
        for key, value in message.items():
            n += len(encoding.encode(value))
            if key == "name":
                n += 1
    return n + 3


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def encoding(home):
    return encoding_for_model(MODELS["o200k_base"], OpenAITrainConfig(), home)


@pytest.fixture
def offline(monkeypatch):
    """No download can happen: tiktoken's fetch raises what requests raises without a network, and its
    in-process registry is emptied so every encoding is loaded again."""
    import tiktoken.load
    import tiktoken.registry

    def no_network(*_a, **_k):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    for name in ("o200k_base", "cl100k_base", "p50k_base"):
        monkeypatch.delitem(tiktoken.registry.ENCODINGS, name, raising=False)


def random_examples(n, seed=0):
    rng = random.Random(seed)
    words = ["sync", "invoice", "Lumenfold", "folder", "can't", "2FA", "réglage", "日本", "  ", "\n", "42", "!!"]
    out = []
    for i in range(n):
        msgs = [{"role": "system", "content": "You are the help desk."}]
        for _ in range(rng.randint(1, 3)):
            msgs.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 60)))})
            msgs.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 20)))})
        if i % 7 == 0:
            msgs[1]["name"] = "customer"
        out.append(msgs)
    return out


# Unicode blocks an encoder's pre-tokenizer and byte fallback treat differently.
SCRIPTS = [(0x4E00, 0x9FFF), (0x3040, 0x30FF), (0xAC00, 0xD7A3), (0x0600, 0x06FF), (0x0590, 0x05FF),
           (0x0900, 0x097F), (0x0E00, 0x0E7F), (0x0400, 0x04FF), (0x0370, 0x03FF), (0x1F300, 0x1FAFF),
           (0x0300, 0x036F), (0x2000, 0x206F), (0xFF00, 0xFFEF), (0x10000, 0x1007F), (0x00A0, 0x024F)]
SPECIAL_LOOKALIKES = ["<|endoftext|>", "<|endofprompt|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>",
                      "<|start|>assistant<|message|>", "<|endoftext", "|>", "<||>", "< |endoftext| >"]


def varied_texts(n: int, seed: int = 0) -> list[str]:
    """Code (this project's sources), non-Latin scripts, emoji sequences, combining marks, long runs of
    whitespace and digits, special-token look-alikes, and random mixtures of all of them."""
    rng = random.Random(seed)
    code = [line for f in sorted((ROOT / "tasks").glob("*.py")) for line in f.read_text().split("\n\n")]
    pieces = {
        "code": lambda: rng.choice(code),
        "script": lambda: "".join(chr(rng.randint(*rng.choice(SCRIPTS))) for _ in range(rng.randint(1, 80))),
        "emoji": lambda: rng.choice(["👩‍👩‍👧‍👦", "🏳️‍🌈", "👍🏽", "🇫🇷🇩🇪", "🧑🏿‍💻", "❤️‍🔥", "😀"]) * rng.randint(1, 9),
        "space": lambda: "".join(rng.choice([" ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u200b"])
                                 for _ in range(rng.randint(1, 300))),
        "digits": lambda: "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 400)))
                          + rng.choice(["", ".5", ",000", "e-10", "%"]),
        "special": lambda: rng.choice(SPECIAL_LOOKALIKES) + rng.choice(["", " ", "x", "\n"]),
        "words": lambda: " ".join(rng.choice(["The", "don't", "WON'T", "naïve", "Straße", "ﬁnance", "e\u0301",
                                              "x²", "camelCase", "snake_case", "http://a.b/c?d=1"])
                                  for _ in range(rng.randint(1, 40))),
    }
    kinds = list(pieces)
    texts = [pieces[k]() for k in kinds for _ in range(5)]  # every kind alone
    while len(texts) < n:
        text = "".join(pieces[rng.choice(kinds)]() for _ in range(rng.randint(2, 6)))
        texts.append(unicodedata.normalize(rng.choice(["NFC", "NFD"]), text) if rng.random() < 0.2 else text)
    return texts


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_openai_encodings_load_offline_from_the_installed_package(name, tmp_path, offline, monkeypatch):
    cache = tmp_path / "cache"
    counter = openai_counter(MODELS[name], OpenAITrainConfig(tiktoken_cache_dir=cache), tmp_path)
    assert counter.name == f"tiktoken:{name}" and counter.engine == "quicktok"
    assert counter.encoding.encode_ordinary("Hello, world!") == HELLO[name]  # tiktoken itself, on the real ranks
    url, sha256 = tokens.published_file(name)
    written = cache / hashlib.sha1(url.encode()).hexdigest()
    assert hashlib.sha256(written.read_bytes()).hexdigest() == sha256  # OpenAI's file, byte for byte
    # `tuneloop estimate` uses the same path; a second load finds the file in the cache and rebuilds nothing
    monkeypatch.setattr(tokens, "packaged_tiktoken_file", lambda _name: pytest.fail("rebuilt a cached file"))
    assert encoding_for_model(MODELS[name], OpenAITrainConfig(tiktoken_cache_dir=cache), tmp_path).n_vocab \
        == counter.encoding.n_vocab


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_the_fast_encoder_counts_exactly_what_tiktoken_counts_on_a_varied_corpus(name, home):
    fast = openai_counter(MODELS[name], OpenAITrainConfig(), home)
    assert isinstance(fast, QuicktokCounter)
    reference = TiktokenCounter(fast.encoding, threads=1)
    texts = varied_texts(4000, seed=len(name))
    want = [len(fast.encoding.encode_ordinary(t)) for t in texts]
    got = fast.lengths(texts)
    bad = [(t[:60], g, w) for t, g, w in zip(texts, got, want, strict=True) if g != w]
    assert not bad, f"{len(bad)} texts counted differently, e.g. {bad[:3]}"
    rng = random.Random(1)
    examples = []
    for i in range(0, len(texts) - 4, 4):
        messages = [{"role": "system", "content": texts[i]}, {"role": "user", "content": texts[i + 1]},
                    {"role": "assistant", "content": texts[i + 2]}]
        if rng.random() < 0.2:
            messages[1]["name"] = rng.choice(["customer", "日本", "<|endoftext|>"])
        if rng.random() < 0.1:
            messages.append({"role": "assistant", "content": None, "weight": 0, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": texts[i + 3]}}]})
        examples.append(messages)
    assert fast.count(examples) == reference.count(examples)
    # as the export counts: chunk by chunk, each prepared here and finished elsewhere
    assert [n for i in range(0, len(examples), 7) for n in fast.finish(fast.prepare(examples[i:i + 7]))] \
        == reference.count(examples)


def test_tiktoken_counts_equal_the_recipe_on_every_example_threaded_or_not(encoding, home):
    examples = random_examples(3000)
    expected = [recipe_count(encoding, m) for m in examples]
    assert TiktokenCounter(encoding, threads=1).count(examples) == expected
    assert TiktokenCounter(encoding, threads=2).count(examples) == expected
    assert openai_counter(MODELS["o200k_base"], OpenAITrainConfig(), home).count(examples) == expected
    assert encoding.name == "o200k_base" and encoding.n_vocab == 200_019


def test_tiktoken_counts_when_the_ranks_are_not_openais_or_the_fast_encoder_disagrees(
        encoding, home, tmp_path, monkeypatch, caplog):
    # a .tiktoken file of other ranks (the first 1,000 of o200k: a valid but different BPE): only tiktoken
    # can count with it
    full = tokens.packaged_tiktoken_file("o200k_base")
    small = tmp_path / "small.tiktoken"
    small.write_bytes(b"\n".join(full.split(b"\n")[:1000]) + b"\n")
    counter = openai_counter(MODELS["o200k_base"], OpenAITrainConfig(tiktoken_file=small), tmp_path)
    assert counter.engine == "tiktoken" and counter.encoding.encode_ordinary("Hello, world!") != HELLO["o200k_base"]
    published = tmp_path / "o200k_base.tiktoken"
    published.write_bytes(full)
    assert openai_counter(MODELS["o200k_base"], OpenAITrainConfig(tiktoken_file=published), tmp_path).engine == "quicktok"
    monkeypatch.setitem(tokens._AGREES, "o200k_base", False)
    with caplog.at_level(logging.WARNING):
        assert openai_counter(MODELS["o200k_base"], OpenAITrainConfig(), home).engine == "tiktoken"
    assert "quicktok disagrees with tiktoken on o200k_base" in caplog.text


def test_weight_is_not_text_and_tool_calls_count_as_json(encoding):
    counter = TiktokenCounter(encoding, threads=1)
    plain = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    weighted = [plain[0], {**plain[1], "weight": 1}]
    assert counter.count([weighted]) == counter.count([plain])
    call = [plain[0], {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
                                                                            "function": {"name": "f", "arguments": "{}"}}]}]
    assert counter.count([call])[0] > counter.count([plain])[0]


def test_chat_template_counter_counts_what_the_trainer_sees(tmp_path):
    from tuneloop.core.models import load_tokenizer
    from tuneloop.lib.base_model import resolve_base_model

    cfg = load_config(DEMO_CONFIG)
    tok = load_tokenizer(resolve_base_model(cfg.train, tmp_path))
    examples = random_examples(5)
    counts = ChatTemplateCounter(tok, "tiny").count(examples)
    assert counts == [len(tok.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"]) for m in examples]


def test_auto_epochs_follow_openais_default_rule():
    assert resolve_epochs(1000, "auto") == 3
    assert resolve_epochs(10, "auto") == 10  # 10 x 3 < 100: raised to 100 // 10
    assert resolve_epochs(2, "auto") == 25  # capped at 25
    assert resolve_epochs(20_000, "auto") == 1  # 60,000 > 25,000: lowered to 25,000 // 20,000
    assert resolve_epochs(9_000, "auto") == 2
    assert resolve_epochs(10, 4) == 4  # a number is used as given


def test_estimate_bills_min_of_limit_and_tokens_times_epochs_at_the_configured_price():
    cfg = OpenAITrainConfig(models={"m": {"context_tokens": 100, "usd_per_1m_training_tokens": 8.0}}, model="m")
    counts = [50] * 40 + [250] * 10  # 10 examples over the limit are billed at the limit
    est = estimate_cost(counts, "m", cfg)
    assert est.epochs == 3 and est.tokens_per_epoch == 40 * 50 + 10 * 100
    assert est.billed_tokens == 9000 and est.estimated_cost_usd == pytest.approx(9000 / 1e6 * 8.0)
    assert est.n_over_limit == 10
    assert estimate_cost(counts, "ft:m:acme::abc", cfg, n_epochs=1).billed_tokens == 3000  # priced as its base
    with pytest.raises(TuneloopError, match="train.openai.models has no entry for 'gpt-9'"):
        estimate_cost(counts, "gpt-9", cfg)
    stats = token_stats(counts, 100, "x")
    assert (stats.min, stats.p50, stats.max, stats.total, stats.n_over_limit) == (50, 50, 250, 4500, 10)


def test_budget_refuses_before_upload_and_says_why():
    cfg = OpenAITrainConfig(models={"m": {"context_tokens": 1000, "usd_per_1m_training_tokens": 25.0}}, model="m")
    est = estimate_cost([1000] * 2000, "m", cfg)  # 2M tokens/epoch x 3 = 6M tokens = $150
    enforce_budget(est, 200.0)
    enforce_budget(est, None)
    with pytest.raises(TuneloopError, match=r"\$150.00 exceeds train.max_cost_usd \$100.00 .*nothing was uploaded"):
        enforce_budget(est, 100.0)


def test_an_encoding_no_package_ships_offline_says_how_to_provide_it(tmp_path, offline):
    cfg = OpenAITrainConfig(tiktoken_cache_dir=tmp_path / "cache")
    with pytest.raises(TuneloopError) as err:
        encoding_for_model("text-davinci-003", cfg, tmp_path)  # p50k_base: in tiktoken's list, in no wheel
    msg = str(err.value)
    assert "'p50k_base'" in msg and str(tmp_path / "cache") in msg and "p50k_base.tiktoken" in msg
    assert "train.openai.tiktoken_file" in msg
    with pytest.raises(TuneloopError, match="does not know which encoding"):
        encoding_for_model("my-own-model", cfg, tmp_path)
