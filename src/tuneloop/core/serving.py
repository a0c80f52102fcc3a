"""The registered model as an MLflow pyfunc: ``mlflow.pyfunc.load_model("models:/NAME@champion")`` answers
in one call, whichever backend trained it, so a downstream service never needs to know.

A local model is its LoRA adapter on its base model (the base is packed in when it is a small local
folder, such as the demo's tiny model, and referenced by hub id or path otherwise); an OpenAI model is
its model id, called through the API with the provider settings it was trained with and the key from
the environment at load time (never stored). On Azure OpenAI with managed deployments, it is called through
the champion's deployment (``train.openai.azure_deployments.champion_deployment``): whichever fine-tune that
deployment serves, which tuneloop keeps the champion's.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow.pyfunc

PACK_BASE_BELOW_BYTES = 200 * 2**20


@dataclass(frozen=True)
class ChatAnswer:
    """One answer to a whole chat, with what an OpenAI-compatible caller expects besides the text."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop": the model ended its turn; "length": max_tokens cut it


class ChatRefused(ValueError):
    """A chat this model cannot answer as asked (too long for its context): the caller's to fix."""


class ChampionModel(mlflow.pyfunc.PythonModel):
    """Input: a list of ticket texts (each the user message; the system prompt comes with the model).
    Output: the model's answers, in order. MLflow validates the input against the type hint."""

    def load_context(self, context) -> None:
        self.spec = json.loads(Path(context.artifacts["spec"]).read_text())
        self.is_local = self.spec["backend"] == "local"  # the one read of the spec's backend
        if self.is_local:
            from peft import PeftModel

            from tuneloop.core.models import load_causal_lm, load_tokenizer

            base = context.artifacts.get("base_model") or self.spec["base_model"]
            self.tokenizer = load_tokenizer(context.artifacts["adapter"])
            self.model = PeftModel.from_pretrained(load_causal_lm(base), context.artifacts["adapter"])

    def _prompts(self, texts: list[str]) -> list[list[dict]]:
        system = [{"role": "system", "content": self.spec["system"]}] if self.spec.get("system") else []
        return [[*system, {"role": "user", "content": text}] for text in texts]

    def predict(self, context, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        prompts = self._prompts(model_input)
        max_new_tokens = int((params or {}).get("max_new_tokens", self.spec["max_new_tokens"]))
        if self.is_local:
            from tuneloop.core.generation import generate

            return generate(self.model, self.tokenizer, [SimpleNamespace(prompt=p) for p in prompts], max_new_tokens,
                            batch_size=16)
        from tuneloop.core.config import ApiClientConfig
        from tuneloop.core.openai_client import chat_completions

        return chat_completions(ApiClientConfig(**self.spec["openai"]), self.api_model, prompts, max_new_tokens)

    @property
    def api_model(self) -> str:
        """What the API is asked for: the Azure deployment the champion answers through, else the model id."""
        return self.spec.get("deployment") or self.spec["fine_tuned_model"]

    def answer_chat(self, messages: list[dict], max_tokens: int | None = None,
                    default_max_tokens: int | None = None) -> ChatAnswer:
        """Answer a whole chat as an app sends it to an OpenAI model (``{"role", "content": str}`` messages):
        the chat's own system message if it has one, else the model's; greedy, with the code evaluation
        scored. ``max_tokens`` None: ``default_max_tokens`` (a server's default, capped by the context left
        after the prompt), else the budget the version was evaluated with. A local model's token counts are its
        tokenizer's (the end-of-turn token not counted); an API model's, the service's."""
        *_, final = self.stream_chat(messages, max_tokens, default_max_tokens)
        return final

    def stream_chat(self, messages: list[dict], max_tokens: int | None = None,
                    default_max_tokens: int | None = None) -> Iterator[str | ChatAnswer]:
        """``answer_chat`` as it is written: the text in pieces as the model generates them, then the whole
        ``ChatAnswer``. Raises ChatRefused before the first piece when the chat cannot be answered as asked.
        An API-trained model's answer comes as one piece (it is asked without streaming, with its retries)."""
        messages, max_tokens, prompt = self._prepared(messages, max_tokens, default_max_tokens)
        if not self.is_local:
            return self._one_piece(self._answer_chat_by_api(messages, max_tokens))
        return self._stream_local(prompt, max_tokens)

    def _prepared(self, messages: list[dict], max_tokens: int | None, default_max_tokens: int | None):
        if self.spec.get("system") and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.spec["system"]}, *messages]
        if not self.is_local:
            return messages, int(max_tokens or default_max_tokens or self.spec["max_new_tokens"]), None
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt = self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        context = getattr(self.model.config, "max_position_embeddings", None)
        if max_tokens is None and default_max_tokens is not None:  # the server's default: whatever room is left
            max_tokens = min(default_max_tokens, context - len(prompt)) if context else default_max_tokens
            if max_tokens < 1:
                raise ChatRefused(f"this model's maximum context length is {context} tokens and the messages take "
                                  f"{len(prompt)}: shorten the messages")
        max_tokens = int(max_tokens or self.spec["max_new_tokens"])
        if context and len(prompt) + max_tokens > context:
            raise ChatRefused(f"this model's maximum context length is {context} tokens; the messages take "
                              f"{len(prompt)} and max_tokens asks for {max_tokens}: shorten the messages or "
                              "lower max_tokens")
        return messages, max_tokens, prompt

    @staticmethod
    def _one_piece(answer: ChatAnswer) -> Iterator[str | ChatAnswer]:
        if answer.text:
            yield answer.text
        yield answer

    def _stream_local(self, prompt: list[int], max_tokens: int) -> Iterator[str | ChatAnswer]:
        """Greedy generation on a second thread, its text read as it comes (transformers' TextIteratorStreamer);
        the same stop tokens and decoding as ``core.generation.generate``, so the answer is the same."""
        import threading

        import torch
        from transformers import TextIteratorStreamer

        from tuneloop.core.chat_templates import stop_token_ids

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = stop_token_ids(self.tokenizer, self.model)
        ids = torch.tensor([prompt], device=self.model.device)
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                with torch.inference_mode():
                    result["out"] = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                        max_new_tokens=max_tokens, do_sample=False, use_cache=True,
                                                        pad_token_id=self.tokenizer.pad_token_id, eos_token_id=stop,
                                                        streamer=streamer)
            except BaseException as exc:  # noqa: BLE001 - handed to the reader, which raises it
                result["error"] = exc
                streamer.end()

        worker = threading.Thread(target=run, name="tuneloop-generate", daemon=True)
        self.model.eval()
        worker.start()
        pieces = []
        for piece in streamer:
            if piece:
                pieces.append(piece)
                yield piece
        worker.join()
        if "error" in result:
            raise result["error"]
        new = result["out"][0, len(prompt):].tolist()
        used = next((n for n, t in enumerate(new) if t in stop), len(new))
        yield ChatAnswer("".join(pieces), len(prompt), used, "length" if used >= max_tokens else "stop")

    def _answer_chat_by_api(self, messages: list[dict], max_tokens: int) -> ChatAnswer:
        """The fine-tuned API model, called with the provider settings it was trained with; retries and
        key scrubbing as everywhere (core.openai_client.call)."""
        from tuneloop.core.config import ApiClientConfig
        from tuneloop.core.openai_client import Secrets, call, env_api_key, make_client

        cfg = ApiClientConfig(**self.spec["openai"])
        key = env_api_key(cfg)
        model = self.api_model
        client = make_client(cfg, key)
        reply = call(lambda: client.chat.completions.create(model=model, messages=messages, temperature=0,
                                                            max_tokens=max_tokens),
                     f"chat.completions ({model})", cfg, Secrets(key))
        choice, usage = reply.choices[0], reply.usage
        return ChatAnswer(choice.message.content or "", usage.prompt_tokens if usage else 0,
                          usage.completion_tokens if usage else 0,
                          "length" if choice.finish_reason == "length" else "stop")


def save_champion_model(out: Path, backend: str, base_model: str, adapter_path: Path | None,
                        fine_tuned_model: str | None, openai: dict[str, Any], system: str | None,
                        max_new_tokens: int, deployment: str | None = None) -> Path:
    """Write the pyfunc model folder that a registered version points at (``deployment``: the Azure deployment
    an API model answers through)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    spec_path = out.parent / "champion_spec.json"
    spec_path.write_text(json.dumps({"backend": backend, "base_model": base_model, "fine_tuned_model": fine_tuned_model,
                                     "openai": openai, "system": system, "max_new_tokens": max_new_tokens,
                                     "deployment": deployment}, indent=2))
    artifacts = {"spec": str(spec_path)}
    if adapter_path is not None:
        artifacts["adapter"] = str(adapter_path)
        base = Path(base_model)
        if base.is_dir() and sum(f.stat().st_size for f in base.rglob("*") if f.is_file()) < PACK_BASE_BELOW_BYTES:
            artifacts["base_model"] = str(base)
    if out.exists():
        shutil.rmtree(out)
    mlflow.pyfunc.save_model(
        path=str(out), python_model=str(Path(__file__).with_name("champion_model.py")), artifacts=artifacts,
        # explicit, so MLflow does not infer (slowly) what the environment holds
        pip_requirements=[f"mlflow=={mlflow.__version__}", "torch", "transformers", "peft", "openai", "tuneloop"],
    )
    return out
