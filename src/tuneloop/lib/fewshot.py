"""The prompted baseline: the base model asked with the label set and k solved examples from the training split
in its prompt. It answers the question a team asks before paying for fine-tuning (does prompting do as well?),
and a candidate must beat it before it is called better.

Shots are chosen without a model: for classification the shortest training example of each label, the most
common labels first, their answers cut at the end of the label (the part that is scored); for generation the
k shortest examples. They go in as earlier turns of the chat, so the model's own chat template formats them;
shots are dropped from the end until the prompt and the answer budget fit the model's context.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from tuneloop.lib.heldout import HeldOutExample

MAX_LISTED_LABELS = 60


@dataclass(frozen=True)
class PromptedBaseline:
    shots: list[list[dict]]  # each: the example's turns without its system message, the answer last
    labels: list[str]  # classification: the training split's label set, named in the system message
    used: list[int] = field(default_factory=list)  # shots each example was asked with, by the last prompts()

    def prompts(self, heldout: list[HeldOutExample], fits: Callable[[list[dict]], bool]) -> list[HeldOutExample]:
        """Each held-out example asked with the label set and as many shots as fit (counted in ``used``)."""
        out, used = [], []
        for example in heldout:
            system = [m for m in example.prompt[:1] if m.get("role") == "system"]
            rest = example.prompt[len(system):]
            if self.labels:
                listed = (", ".join(self.labels) if len(self.labels) <= MAX_LISTED_LABELS
                          else ", ".join(self.labels[:MAX_LISTED_LABELS]) + ", ...")
                note = f"Answer with one of these labels: {listed}."
                text = f"{system[0]['content']}\n\n{note}" if system else note
                system = [{"role": "system", "content": text}]
            shots = list(self.shots)
            while True:
                prompt = [*system, *(m for shot in shots for m in shot), *rest]
                if not shots or fits(prompt):
                    break
                shots.pop()
            out.append(example.model_copy(update={"prompt": prompt}))
            used.append(len(shots))
        self.used[:] = used
        return out



def _conversations(train_path: Path) -> list[list[dict]]:
    with train_path.open("rb") as fh:
        return [orjson.loads(line)["messages"] for line in fh if line.strip()]


def prompted_baseline(train_path: Path | None, k: int, task: str, pattern: re.Pattern[str]) -> PromptedBaseline | None:
    """The shots and label set from the exported training split; None when there is none or k is 0."""
    from tuneloop.lib.metrics import parse_label

    if k <= 0 or train_path is None or not train_path.is_file():
        return None
    solved = [c for c in _conversations(train_path) if c and c[-1].get("role") == "assistant"]
    turns = [[m for m in c if m.get("role") != "system"] for c in solved]
    if task != "classification":
        chosen = sorted(range(len(turns)), key=lambda i: (sum(len(str(m.get("content"))) for m in turns[i]), i))[:k]
        return PromptedBaseline(shots=[turns[i] for i in chosen], labels=[]) if chosen else None
    by_label: dict[str, list[int]] = {}
    for i, c in enumerate(solved):
        label = parse_label(str(c[-1].get("content") or ""), pattern)
        if label is not None:
            by_label.setdefault(label, []).append(i)
    if not by_label:
        return None
    counts = Counter({label: len(ids) for label, ids in by_label.items()})
    order = sorted(by_label, key=lambda lab: (-counts[lab], lab))
    queues = {lab: sorted(by_label[lab], key=lambda i: (sum(len(str(m.get("content"))) for m in turns[i]), i))
              for lab in order}
    shots: list[list[dict]] = []
    while len(shots) < k and any(queues.values()):
        for lab in order:
            if queues[lab] and len(shots) < k:
                i = queues[lab].pop(0)
                answer = str(turns[i][-1]["content"])
                m = pattern.search(answer)
                cut = answer[:m.end(1)] if m else answer  # what is scored: the answer up to its label
                shots.append([*turns[i][:-1], {"role": "assistant", "content": cut}])
    return PromptedBaseline(shots=shots, labels=sorted(by_label))
