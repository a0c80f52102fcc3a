"""Token counts (tiktoken for OpenAI models, the chat template for local), epochs, cost, budget, offline."""

import random

import pytest

from conftest import DEMO_CONFIG
from tuneloop.core.config import OpenAITrainConfig, load_config
from tuneloop.core.records import TuneloopError
from tuneloop.tasks.tokens import (
    ChatTemplateCounter,
    TiktokenCounter,
    encoding_for_model,
    enforce_budget,
    estimate_cost,
    resolve_epochs,
    token_stats,
)


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
def encoding(tiktoken_file, tmp_path_factory):
    cfg = OpenAITrainConfig(tiktoken_file=tiktoken_file)
    return encoding_for_model("gpt-4o-mini-2024-07-18", cfg, tmp_path_factory.mktemp("home"))


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


def test_tiktoken_counts_equal_the_recipe_on_every_example_threaded_or_not(encoding):
    examples = random_examples(3000)
    expected = [recipe_count(encoding, m) for m in examples]
    assert TiktokenCounter(encoding, threads=1).count(examples) == expected
    assert TiktokenCounter(encoding, threads=2).count(examples) == expected
    assert encoding.name == "o200k_base" and encoding.n_vocab >= 300


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
    from tuneloop.tasks.base_model import resolve_base_model

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


def test_missing_encoding_offline_says_how_to_provide_it(tmp_path, monkeypatch):
    import tiktoken.load

    def offline(*_a, **_k):
        raise ConnectionError("no network")  # what requests raises here without a network

    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    import tiktoken.registry

    tiktoken.registry.ENCODINGS.pop("cl100k_base", None)
    cfg = OpenAITrainConfig(tiktoken_cache_dir=tmp_path / "cache")
    with pytest.raises(TuneloopError) as err:
        encoding_for_model("gpt-3.5-turbo-0125", cfg, tmp_path)
    msg = str(err.value)
    assert "'cl100k_base'" in msg and str(tmp_path / "cache") in msg and "cl100k_base.tiktoken" in msg
    assert "train.openai.tiktoken_file" in msg
    with pytest.raises(TuneloopError, match="does not know which encoding"):
        encoding_for_model("my-own-model", cfg, tmp_path)
