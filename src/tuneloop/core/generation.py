"""Greedy generation with a local model: the same code answers held-out examples in evaluation and
requests to the served champion, so a score measures what a user gets.

An answer ends at the chat template's end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``...)
as well as at the model's end-of-sequence tokens: a base model's generation config often names only
``<|endoftext|>``, and a model fine-tuned on its chat template stops with the end-of-turn token instead."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Prompted(Protocol):
    """Anything with chat messages to answer (a held-out example, a served request)."""

    prompt: list[dict]


def generate(model, tokenizer, examples: Sequence[Prompted], max_new_tokens: int, batch_size: int,
             lengths: list[int] | None = None) -> list[str]:
    """The model's answers to each example's ``prompt``, in order, in batches of ``batch_size``.

    Batches hold prompts of similar length (sorted, longest first, so a batch too large for memory fails at
    once), left-padded; each stops when every answer in it has reached a stop token, and the KV cache is kept
    across decoding steps. ``lengths``, when given, receives each answer's generated token count up to its
    stop token (not counted): the served endpoint's usage, exact where re-tokenizing the text is not;
    ``max_new_tokens`` means cut short."""
    import torch

    from tuneloop.core.chat_templates import stop_token_ids

    tokenizer.padding_side = "left"
    stop = stop_token_ids(tokenizer, model)
    prompts = [tokenizer.apply_chat_template(e.prompt, tokenize=False, add_generation_prompt=True) for e in examples]
    if not prompts:
        return []
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    outputs: list[str] = [""] * len(ids)
    used: list[int] = [0] * len(ids)
    model.eval()
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        enc = tokenizer.pad({"input_ids": [ids[i] for i in rows]}, padding=True, return_tensors="pt")
        enc = {k: v.to(model.device) for k, v in enc.items()}
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=stop)
        new = out[:, enc["input_ids"].shape[1]:]
        for i, text, row in zip(rows, tokenizer.batch_decode(new, skip_special_tokens=True), new.tolist(), strict=True):
            outputs[i] = text
            used[i] = next((n for n, t in enumerate(row) if t in stop), len(row))
    if lengths is not None:
        lengths.extend(used)
    return outputs
