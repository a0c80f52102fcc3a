"""Chat templates for training: which template formats the examples, which tokens the loss is on, and which
token ends an answer.

The loss is on assistant tokens only, which TRL finds through ``{% generation %}`` markers in the chat template.
Real model families (Qwen, Llama, Gemma, Phi) ship templates without them; TRL swaps in a training variant for
the templates it knows (``trl/chat_templates/*_training.jinja``) and refuses the others. tuneloop makes the
choice itself, before the model is loaded, and checks the result on one conversation: the supervised tokens
must be the answer and the end-of-turn token (a model never trained on it never learns to stop), nothing of
the prompt. The chosen template is saved with the adapter's tokenizer, so evaluation and the served model
format prompts exactly as training did, and generation stops at the same end-of-turn token.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from tuneloop.core.records import TuneloopError

CHATML = "chatml"
_MARKERS = re.compile(r"\{%-?\s*generation\s*-?%\}")
_PROBE_USER, _PROBE_ANSWER = "Where is my invoice for March?", "queue: billing"


def has_generation_markers(template: str | None) -> bool:
    return template is not None and _MARKERS.search(template) is not None


def trl_templates_dir() -> Path | None:
    """TRL's shipped chat templates, found without importing TRL (which takes seconds)."""
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "chat_templates"
    return folder if folder.is_dir() else None


def template_names() -> list[str]:
    """The names ``train.local.chat_template`` accepts: tuneloop's ChatML and every training template TRL ships."""
    folder = trl_templates_dir()
    shipped = sorted(p.name.removesuffix("_training.jinja") for p in folder.glob("*_training.jinja")) if folder else []
    return [CHATML, *shipped]


def template_from_option(option: str) -> str:
    """The text of ``train.local.chat_template``: a Jinja file, ``chatml``, or the name of a TRL training template."""
    from tuneloop.core.models import CHATML_TEMPLATE

    if option == CHATML:
        return CHATML_TEMPLATE
    path = Path(option).expanduser()
    if path.suffix in {".jinja", ".j2"} or path.is_file():
        if not path.is_file():
            raise TuneloopError(f"train.local.chat_template: {path} does not exist")
        return path.read_text(encoding="utf-8")
    folder = trl_templates_dir()
    if folder is not None and (folder / f"{option}_training.jinja").is_file():
        return (folder / f"{option}_training.jinja").read_text(encoding="utf-8")
    raise TuneloopError(f"train.local.chat_template: {option!r} is neither a .jinja file nor a known template "
                        f"(known: {', '.join(template_names())})")


def _own_template(tokenizer) -> str | None:
    template = tokenizer.chat_template
    return template.get("default") if isinstance(template, dict) else template


def _fix() -> str:
    return ("set train.local.chat_template to a .jinja file whose assistant turns (answer and end-of-turn token) "
            "are wrapped in {% generation %}...{% endgeneration %}, or, if the model writes conversations in that "
            "format, to the name of a training template TRL ships (e.g. llama3, qwen2_5, gemma3, phi3, "
            "chatml; all in trl/chat_templates/*_training.jinja)")


def training_chat_template(tokenizer, base_model: str, option: str | None = None,
                           example: list[dict] | None = None) -> str:
    """The chat template the trainer formats with, checked before any model is loaded; raises TuneloopError.

    ``option`` is ``train.local.chat_template`` (it wins when set); otherwise the base model's own template if it
    has generation markers, else TRL's training variant of it, else a refusal saying what to do. ``example`` (one
    training conversation) is rendered too, so a template that rejects its roles (Gemma 1/2 and a system
    message) is refused here, not halfway through tokenizing the dataset.
    """
    where = "train.local.chat_template" if option else f"base model {base_model}'s chat template"
    template = template_from_option(option) if option else _own_template(tokenizer)
    if template is None:
        from tuneloop.core.models import CHATML_TEMPLATE

        template = CHATML_TEMPLATE
    if not has_generation_markers(template):
        if option:
            raise TuneloopError(f"{where} has no {{% generation %}} markers, so the loss cannot be limited to the "
                                f"answers: wrap each assistant answer and its end-of-turn token in "
                                f"{{% generation %}}...{{% endgeneration %}}")
        from trl.chat_template_utils import get_training_chat_template

        try:
            template = get_training_chat_template(tokenizer) or template
        except ValueError:
            recognised = recognise_template(tokenizer, template)
            if recognised is None:
                raise TuneloopError(f"{where} has no {{% generation %}} markers, TRL has no training template for "
                                    f"it, and it renders like none of {', '.join(template_names())}: {_fix()}") from None
            template = recognised[1]
    check_assistant_mask(tokenizer, template, where, example)
    return template


# Conversations a template is compared on: a system message (a model's template may add a default one when
# there is none, which tells nothing about its format), one and two turns, and the prompt left open for an answer.
_RECOGNITION_PROBES: list[tuple[list[dict], bool]] = [
    ([{"role": "system", "content": "You sort tickets."}, {"role": "user", "content": _PROBE_USER},
      {"role": "assistant", "content": _PROBE_ANSWER}], False),
    ([{"role": "system", "content": "You sort tickets."}, {"role": "user", "content": _PROBE_USER},
      {"role": "assistant", "content": _PROBE_ANSWER}, {"role": "user", "content": "And April?"},
      {"role": "assistant", "content": "queue: billing, too"}], False),
    ([{"role": "system", "content": "You sort tickets."}, {"role": "user", "content": _PROBE_USER}], True),
]


def recognise_template(tokenizer, template: str) -> tuple[str, str] | None:
    """The training template (name, text) that writes every probe conversation exactly as ``template`` does, or
    None: a model's template that TRL does not know by its text (SmolLM2's is ChatML with a default system
    prompt) still trains without user action when it renders like one tuneloop or TRL has markers for."""
    from jinja2 import TemplateError

    def render(text: str, messages: list[dict], open_prompt: bool) -> str | None:
        try:
            return tokenizer.apply_chat_template(messages, chat_template=text, tokenize=False,
                                                 add_generation_prompt=open_prompt)
        except (TemplateError, TypeError, ValueError):
            return None

    own = [render(template, m, g) for m, g in _RECOGNITION_PROBES]
    if any(r is None for r in own):
        return None
    for name in template_names():
        candidate = template_from_option(name)
        if [render(candidate, m, g) for m, g in _RECOGNITION_PROBES] == own:
            return name, candidate
    return None


def first_conversation(path: Path) -> list[dict] | None:
    """The messages of the first example in a chat JSONL file (the export's train split), to check the template on."""
    if not path.is_file():
        return None
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                return json.loads(line).get("messages")
    return None


def _render(tokenizer, template: str, messages: list[dict], where: str, **kwargs):
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, **kwargs)
    except (TemplateError, TypeError, ValueError) as exc:
        roles = "/".join(m["role"] for m in messages)
        raise TuneloopError(f"{where} cannot render a {roles} conversation ({str(exc).splitlines()[0]}); "
                            + ("drop the system message (mapping.system) or " if messages[0]["role"] == "system" else "")
                            + _fix()) from None


def _probe(example: list[dict] | None) -> list[dict]:
    """A one-turn conversation shaped like the training data: its system message if it has one."""
    system = [m for m in (example or [])[:1] if m.get("role") == "system"]
    return [*system, {"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ANSWER}]


def check_assistant_mask(tokenizer, template: str, where: str, example: list[dict] | None = None) -> None:
    """The supervised tokens of a conversation must be its answer and the end-of-turn token, nothing of the prompt."""
    if example:
        _render(tokenizer, template, example, where, tokenize=False)
    probe = _probe(example)
    eot = end_of_turn_token(tokenizer, template, probe)
    if eot is None:
        raise TuneloopError(f"{where} ends an assistant turn with no special token (the model could not learn to "
                            f"stop): {_fix()}")
    out = _render(tokenizer, template, probe, where, tokenize=True, return_dict=True,
                  return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    supervised = [i for i, m in zip(ids, mask, strict=True) if m]
    text = tokenizer.decode(supervised)
    if not supervised or _PROBE_ANSWER not in text:
        raise TuneloopError(f"{where}: its {{% generation %}} markers do not enclose the assistant's answer: "
                            f"{_fix()}")
    if tokenizer.convert_tokens_to_ids(eot) not in supervised:
        raise TuneloopError(f"{where} leaves the end-of-turn token {eot} outside {{% generation %}}, so the model "
                            f"would never learn to stop: {_fix()}")
    before = text[:text.index(_PROBE_ANSWER)]
    if before.strip() or _PROBE_USER in text:
        raise TuneloopError(f"{where} marks prompt text as the answer ({before.strip()!r}): {_fix()}")


def end_of_turn_token(tokenizer, template: str | None = None, probe: list[dict] | None = None) -> str | None:
    """The special token the template writes right after an assistant's answer (``<|im_end|>``, ``<|eot_id|>``,
    ``<end_of_turn>``, ``<|end|>``): what the model emits to stop. None when the answer is followed by no special
    token."""
    probe = probe or _probe(None)
    answer = probe[-1]["content"]
    try:
        text = tokenizer.apply_chat_template(probe, chat_template=template or _own_template(tokenizer), tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render the probe names no end-of-turn token
        return None
    if answer not in text:
        return None
    after = text[text.rindex(answer) + len(answer):]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    if not ids:
        return None
    token = tokenizer.convert_ids_to_tokens(ids[0])
    special = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    return token if token in special else None


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Every token that ends an answer: the model's configured end-of-sequence ids, the tokenizer's, and the chat
    template's end-of-turn token (a base model's generation config often knows only ``<|endoftext|>``)."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in [*(configured if isinstance(configured, list) else [configured]), tokenizer.eos_token_id]:
        if i is not None and i not in ids:
            ids.append(i)
    eot = end_of_turn_token(tokenizer)
    eot_id = tokenizer.convert_tokens_to_ids(eot) if eot else None
    if eot_id is not None and eot_id not in ids:
        ids.append(eot_id)
    return ids
