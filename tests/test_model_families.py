"""Real model families, offline: tiny random Qwen2, Llama, Gemma 3 and Phi-3 models with their family's special
tokens and the real chat templates TRL ships (``trl/chat_templates/*.jinja``), trained and served through
tuneloop's own code.

Each family is built the way its *base* checkpoint ships: the family's chat template without ``{% generation %}``
markers, and a generation config whose end-of-sequence token is ``<|endoftext|>`` / ``<|end_of_text|>`` /
``<eos>``, not the end-of-turn token the chat template closes answers with. For each one: the trainer's batches
supervise exactly the answers and the end-of-turn token, the export counts the tokens the trainer sees, the
trained adapter's answers stop at the end-of-turn token, and the serving pyfunc loads and answers. A template
that TRL cannot patch is refused before the model is loaded, with a line saying what to do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tuneloop.core.config import TrainConfig
from tuneloop.core.records import ExportedDataset, TuneloopError

pytestmark = pytest.mark.slow

SYSTEM = "You route tickets for the Acme help desk. Answer with the queue."
LABELS = {"billing": ["I was charged twice for my subscription", "Where is the invoice for March",
                      "Please refund the duplicate payment", "My card was billed after I cancelled"],
          "access": ["I cannot log in since the password reset", "My account is locked after three tries",
                     "The two factor code never arrives", "Please unlock the account of a new hire"]}
MAX_NEW_TOKENS = 12


@dataclass
class Family:
    name: str
    architecture: str  # transformers config class
    template: str  # trl/chat_templates/<template>.jinja, the original (marker-less) template
    specials: list[str]
    eos: str  # the base checkpoint's end-of-sequence token (what its generation config stops at)
    end_of_turn: str  # what the chat template closes an assistant turn with
    bos: str | None = None
    pad: str | None = None
    bos_in_text: bool = False  # the tokenizer itself adds bos (Llama 3, Gemma): the template writes it too
    config: dict = field(default_factory=dict)


FAMILIES = [
    Family("qwen2", "Qwen2Config", "qwen2_5", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
           eos="<|endoftext|>", pad="<|endoftext|>", end_of_turn="<|im_end|>"),
    Family("llama3", "LlamaConfig", "llama3",
           ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
           bos="<|begin_of_text|>", eos="<|end_of_text|>", end_of_turn="<|eot_id|>", bos_in_text=True),
    Family("gemma3", "Gemma3TextConfig", "gemma3", ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
           bos="<bos>", eos="<eos>", pad="<pad>", end_of_turn="<end_of_turn>", bos_in_text=True,
           config={"head_dim": 16, "sliding_window": 64, "query_pre_attn_scalar": 16}),
    Family("phi3", "Phi3Config", "phi3", ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
           eos="<|endoftext|>", pad="<|endoftext|>", end_of_turn="<|end|>"),
]


def trl_template(name: str) -> str:
    from tuneloop.core.chat_templates import trl_templates_dir

    return (trl_templates_dir() / f"{name}.jinja").read_text(encoding="utf-8")


def conversations() -> list[list[dict]]:
    return [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"{text} (ticket {i})"},
             {"role": "assistant", "content": f"queue: {label}"}]
            for i, (label, text) in enumerate((label, t) for label, texts in LABELS.items() for t in texts)]


def build_family_model(family: Family, out: Path) -> Path:
    """A random tiny model of the family's architecture, with a BPE tokenizer carrying its special tokens and
    the family's real chat template, saved as a local base model folder."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    corpus = [m["content"] for c in conversations() for m in c] + ["system user assistant model"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus * 4, trainers.BpeTrainer(
        vocab_size=420, special_tokens=family.specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if family.bos_in_text:  # as the real tokenizers do: encoding plain text starts with bos
        bpe.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", pair=f"{family.bos} $A {family.bos} $B",
            special_tokens=[(family.bos, bpe.token_to_id(family.bos))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=family.bos, eos_token=family.eos,
                                        pad_token=family.pad)
    tokenizer.chat_template = trl_template(family.template)

    torch.manual_seed(0)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    config = getattr(transformers, family.architecture)(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.1,
        **ids, **family.config)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id  # a base checkpoint: it stops at eos only
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_export(folder: Path) -> ExportedDataset:
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"messages": c}) + "\n" for c in conversations())
    for name in ("train", "validation"):
        (folder / f"{name}.jsonl").write_text(lines)
    (folder / "manifest.json").write_text("{}")
    return ExportedDataset(dataset_version="families", directory=folder, train_path=folder / "train.jsonl",
                           validation_path=folder / "validation.jsonl", manifest_path=folder / "manifest.json",
                           n_train=len(conversations()), n_validation=len(conversations()), sha256={})


def train_config(base: Path, **local) -> TrainConfig:
    settings = {"max_steps": 40, "batch_size": 4, "learning_rate": 2e-2, "warmup_steps": 0, "max_length": 128,
                "eval_every": 40, "early_stopping_patience": None, "progress_every": 1000,
                "lora": {"r": 8, "alpha": 16}} | local
    return TrainConfig.model_validate({"base_model": str(base), "local": settings})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: torch's second thread only waits for the first (with other
    processes running, 40 steps took 110 s on 2 threads and 2 s on one)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> ExportedDataset:
    return write_export(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda f: f.name)
def trained(request, tmp_path_factory, export):
    """Each family's base model, built once, and a LoRA adapter trained on it through ``train_lora``."""
    from tuneloop.tasks.train_local import train_lora

    family: Family = request.param
    root = tmp_path_factory.mktemp(family.name)
    base = build_family_model(family, root / "base")
    result = train_lora(export, train_config(base), root / "models", root / "run")
    return family, base, result


def test_the_families_ship_their_real_marker_less_templates(trained):
    """What makes this test mean something: the base model's template is TRL's copy of the family's, with no
    generation markers, and its generation config does not stop at the end-of-turn token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneloop.core.chat_templates import has_generation_markers

    family, base, _ = trained
    tokenizer = AutoTokenizer.from_pretrained(base)
    assert tokenizer.chat_template == trl_template(family.template)
    assert not has_generation_markers(tokenizer.chat_template)
    eos = AutoModelForCausalLM.from_pretrained(base).generation_config.eos_token_id
    assert tokenizer.convert_tokens_to_ids(family.end_of_turn) not in (eos if isinstance(eos, list) else [eos])


def test_the_loss_is_on_the_answers_and_the_end_of_turn_token_only(trained, export, tmp_path):
    """Decode the supervised tokens of the trainer's own batches: each example's answer and the end-of-turn
    token (with the newline some templates write inside the turn), never the system prompt or the ticket."""
    from tuneloop.lib.lora import build_trainer

    family, base, _ = trained
    trainer, tok, _ = build_trainer(export, train_config(base, packing=False, max_steps=1), tmp_path / "m", tmp_path / "c")
    eot = tok.convert_tokens_to_ids(family.end_of_turn)
    answers = [c[-1]["content"] for c in conversations()]
    seen = []
    for batch in trainer.get_train_dataloader():
        for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
            supervised = [i for i, lab in zip(ids, labels, strict=True) if lab != -100]
            assert eot in supervised, f"{family.name}: the end-of-turn token is not trained"
            text = tok.decode(supervised[:supervised.index(eot)])
            assert text.strip() in answers, text
            assert not text[:text.index("queue")].strip(), f"prompt text supervised: {text!r}"
            after = tok.decode(supervised[supervised.index(eot) + 1:], skip_special_tokens=True)
            assert not after.strip(), f"more than the end-of-turn token after the answer: {after!r}"
            prompt = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab == -100])
            assert SYSTEM in prompt and "ticket" in prompt and "queue:" not in prompt
            if family.bos_in_text:
                assert ids.count(tok.bos_token_id) == 1, "bos written twice (template + tokenizer)"
            seen.append(text.strip())
    assert sorted(seen) == sorted(answers)
    supervised_total = sum(int((b["labels"] != -100).sum()) for b in trainer.get_train_dataloader())

    packed, _, _ = build_trainer(export, train_config(base, max_steps=1), tmp_path / "m", tmp_path / "p")  # the default
    batches = list(packed.get_train_dataloader())
    assert sum(int((b["labels"] != -100).sum()) for b in batches) == supervised_total
    assert sum(int((b["labels"] == eot).sum()) for b in batches) == len(answers)


def test_the_export_counts_the_tokens_the_trainer_sees(trained, export, tmp_path):
    """ChatTemplateCounter (the export's token stats) renders with the base template; the trainer with TRL's
    training variant: they must tokenize every example to the same length."""
    from tuneloop.core.models import load_tokenizer
    from tuneloop.lib.lora import build_trainer
    from tuneloop.lib.tokens import ChatTemplateCounter

    family, base, _ = trained
    trainer, _, _ = build_trainer(export, train_config(base, packing=False, max_steps=1), tmp_path / "m", tmp_path / "c")
    counted = ChatTemplateCounter(load_tokenizer(base), family.name).count(conversations())
    assert [len(row["input_ids"]) for row in trainer.train_dataset] == counted


def test_the_trained_model_stops_at_the_end_of_turn_token(trained):
    """Evaluation's answers (lib/answerers.py, core/generation.py): the fine-tuned model writes the label,
    then the end-of-turn token, and generation stops there although the base's generation config names only
    its end-of-sequence token."""
    import tuneloop.lib.answerers as answerers
    from tuneloop.core.config import EvaluateConfig
    from tuneloop.lib.heldout import HeldOutExample

    family, _, result = trained
    losses = [loss for _, loss in result.loss_history]
    assert losses[-1] < losses[0] / 3, losses
    heldout = [HeldOutExample(record_id=str(i), prompt=c[:-1], expected=c[-1]["content"], label=None)
               for i, c in enumerate(conversations())]
    raw = []

    class Recording:
        """The model as generate() sees it, keeping the raw token ids each call returned."""

        def __init__(self, model, tokenizer):
            self.model, self.tokenizer = model, tokenizer

        def __getattr__(self, name):
            return getattr(self.model, name)

        def generate(self, **kwargs):
            out = self.model.generate(**kwargs)
            raw.append((out[:, kwargs["input_ids"].shape[1]:].tolist(), self.tokenizer))
            return out

    real_generate = answerers.generate

    def recording_generate(model, tokenizer, examples, max_new_tokens, batch_size):
        return real_generate(Recording(model, tokenizer), tokenizer, examples, max_new_tokens, batch_size)

    evaluate = EvaluateConfig(holdout=Path("unused.jsonl"), max_new_tokens=MAX_NEW_TOKENS, batch_size=8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(answerers, "generate", recording_generate)
        texts = answerers.local_answers(result.base_model, result.adapter_path, None, heldout, evaluate, answerers.GenerationCache(None, MAX_NEW_TOKENS))
    answers = texts["candidate"]
    expected = [h.expected for h in heldout]
    assert [a.strip() for a in answers] == expected  # the label, and nothing after it
    assert len(raw) == 2  # one batch of base answers, one of the candidate's
    rows, tokenizer = raw[1]
    eot, pad = tokenizer.convert_tokens_to_ids(family.end_of_turn), tokenizer.pad_token_id
    for row in rows:  # each answer ends with the end-of-turn token; what follows is padding, not more text
        assert eot in row and set(row[row.index(eot) + 1:]) <= {pad}, tokenizer.decode(row)
    assert len(rows[0]) < MAX_NEW_TOKENS  # so generation stopped before its budget


def test_the_served_pyfunc_loads_and_answers(trained, tmp_path):
    """The registered model (core/serving.py): base packed in, the adapter's tokenizer with the training template,
    one call answers."""
    import mlflow.pyfunc

    from tuneloop.core.chat_templates import has_generation_markers
    from tuneloop.core.serving import save_champion_model

    family, base, result = trained
    saved = save_champion_model(tmp_path / "pyfunc" / "model", "local", str(base), result.adapter_path, None, {},
                                SYSTEM, MAX_NEW_TOKENS)
    served = mlflow.pyfunc.load_model(str(saved))
    tickets = [c[1]["content"] for c in conversations()[:2]] + [c[1]["content"] for c in conversations()[-2:]]
    answers = served.predict(tickets)
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)
    assert has_generation_markers(served.unwrap_python_model().tokenizer.chat_template)  # trained with, served with
    assert [a.strip() for a in answers] == ["queue: billing"] * 2 + ["queue: access"] * 2


def test_a_template_trl_cannot_patch_is_refused_before_the_model_loads(tmp_path, export, monkeypatch):
    """Llama 3.2's real template (tools, dates, no generation markers, no training variant in TRL) is refused in
    one line that says what to do; with train.local.chat_template naming TRL's Llama 3 training template it
    trains. Gemma 1/2's template rejects the system message: refused too, saying so."""
    import tuneloop.lib.lora as train_local
    from tuneloop.core.models import load_tokenizer
    from tuneloop.lib.tokens import ChatTemplateCounter

    llama = FAMILIES[1]
    base = build_family_model(llama, tmp_path / "llama32")
    (base / "chat_template.jinja").write_text(trl_template("llama3_2"))
    loaded = []
    monkeypatch.setattr(train_local, "load_causal_lm", lambda *a, **k: loaded.append(a) or pytest.fail("loaded"))
    with pytest.raises(TuneloopError) as refused:
        train_local.build_trainer(export, train_config(base), tmp_path / "m", tmp_path / "c")
    message = str(refused.value)
    assert "\n" not in message and not loaded
    assert f"base model {base}'s chat template has no {{% generation %}} markers" in message
    assert "set train.local.chat_template" in message and "llama3" in message
    monkeypatch.undo()

    trainer, tok, _ = train_local.build_trainer(
        export, train_config(base, chat_template="llama3", max_steps=1, packing=False), tmp_path / "m", tmp_path / "c2")
    assert "{%- generation %}" in tok.chat_template
    batch = next(iter(trainer.get_train_dataloader()))
    supervised = [i for i, lab in zip(batch["input_ids"][0].tolist(), batch["labels"][0].tolist(), strict=True)
                  if lab != -100]
    assert tok.convert_tokens_to_ids("<|eot_id|>") in supervised
    # the export counts with the template the trainer uses (Llama 3.2's own adds a dated system header)
    own = ChatTemplateCounter(load_tokenizer(base), "llama32").count(conversations())
    counted = ChatTemplateCounter(load_tokenizer(base), "llama32", "llama3").count(conversations())
    assert counted == [len(row["input_ids"]) for row in trainer.train_dataset] != own

    gemma = FAMILIES[2]
    old = build_family_model(Family(**{**gemma.__dict__, "template": "gemma"}), tmp_path / "gemma2")
    with pytest.raises(TuneloopError, match=r"cannot render a system/user/assistant conversation \(System role not "
                       r"supported\); drop the system message \(mapping.system\) or set train.local.chat_template"):
        train_local.build_trainer(export, train_config(old), tmp_path / "m", tmp_path / "c3")


def test_a_supplied_template_must_train_the_end_of_turn_token(tmp_path):
    """A template whose generation block stops before the end-of-turn token would train a model that never stops."""
    from transformers import AutoTokenizer

    from tuneloop.core.chat_templates import training_chat_template

    base = build_family_model(FAMILIES[0], tmp_path / "qwen")
    tokenizer = AutoTokenizer.from_pretrained(base)
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}"
                   "{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(TuneloopError, match=r"leaves the end-of-turn token <\|im_end\|> outside \{% generation %\}"):
        training_chat_template(tokenizer, str(base), str(bad))
    with pytest.raises(TuneloopError, match="neither a .jinja file nor a known template .*chatml.*qwen2_5"):
        training_chat_template(tokenizer, str(base), "qwen9")
    assert "{% generation %}" in training_chat_template(tokenizer, str(base), "chatml")
