"""core/generation.generate: batched by length, answers back in the caller's order, identical to one at a time."""

from dataclasses import dataclass

import pytest

from conftest import DEMO


@dataclass
class Asked:
    prompt: list[dict]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tuneloop.core.config import TinyBaseConfig
    from tuneloop.core.models import load_causal_lm, load_tokenizer
    from tuneloop.lib.base_model import build_tiny_model

    path = build_tiny_model(TinyBaseConfig(corpus=[DEMO / "tickets.jsonl"], hidden_size=32, num_layers=1, seed=3),
                            tmp_path_factory.mktemp("m") / "tiny")
    return load_causal_lm(path), load_tokenizer(path)


def test_batched_by_length_answers_in_order_as_one_at_a_time(tiny):
    from tuneloop.core.generation import generate

    model, tokenizer = tiny
    words = "my invoice is wrong and the sync folder stopped after the update".split()
    asked = [Asked([{"role": "user", "content": " ".join(words[:n])}]) for n in (3, 12, 1, 7, 12, 5, 2, 9)]
    one_by_one, one_lengths = [], []
    for a in asked:
        one_by_one += generate(model, tokenizer, [a], 12, 1, one_lengths)
    lengths = []
    batched = generate(model, tokenizer, asked, 12, 3, lengths)
    assert batched == one_by_one and lengths == one_lengths
    assert len(set(one_by_one)) > 1  # different prompts, different answers: an order mix-up would show
    assert generate(model, tokenizer, [], 12, 3) == []
