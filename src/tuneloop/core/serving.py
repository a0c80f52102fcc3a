"""The registered model as an MLflow pyfunc: ``mlflow.pyfunc.load_model("models:/NAME@champion")`` answers
in one call, whichever backend trained it, so a downstream service never needs to know.

A local model is its LoRA adapter on its base model (the base is packed in when it is a small local
folder, such as the demo's tiny model, and referenced by hub id or path otherwise); an OpenAI model is
its model id, called through the API with the provider settings it was trained with and the key from
the environment at load time (never stored).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow.pyfunc

PACK_BASE_BELOW_BYTES = 200 * 2**20


class ChampionModel(mlflow.pyfunc.PythonModel):
    """Input: a list of ticket texts (each the user message; the system prompt comes with the model).
    Output: the model's answers, in order. MLflow validates the input against the type hint."""

    def load_context(self, context) -> None:
        self.spec = json.loads(Path(context.artifacts["spec"]).read_text())
        if self.spec["backend"] == "local":
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
        if self.spec["backend"] == "local":
            from tuneloop.core.generation import generate

            return generate(self.model, self.tokenizer, [SimpleNamespace(prompt=p) for p in prompts], max_new_tokens,
                            batch_size=16)
        from tuneloop.core.config import OpenAITrainConfig
        from tuneloop.core.openai_client import chat_completions

        return chat_completions(OpenAITrainConfig(**self.spec["openai"]), self.spec["fine_tuned_model"], prompts,
                                max_new_tokens)


def save_champion_model(out: Path, backend: str, base_model: str, adapter_path: Path | None,
                        fine_tuned_model: str | None, openai: dict[str, Any], system: str | None,
                        max_new_tokens: int) -> Path:
    """Write the pyfunc model folder that a registered version points at."""
    out.parent.mkdir(parents=True, exist_ok=True)
    spec_path = out.parent / "champion_spec.json"
    spec_path.write_text(json.dumps({"backend": backend, "base_model": base_model, "fine_tuned_model": fine_tuned_model,
                                     "openai": openai, "system": system, "max_new_tokens": max_new_tokens}, indent=2))
    artifacts = {"spec": str(spec_path)}
    if adapter_path is not None:
        artifacts["adapter"] = str(adapter_path)
        base = Path(base_model)
        if base.is_dir() and sum(f.stat().st_size for f in base.rglob("*") if f.is_file()) < PACK_BASE_BELOW_BYTES:
            artifacts["base_model"] = str(base)
    if out.exists():
        shutil.rmtree(out)
    mlflow.pyfunc.save_model(
        path=str(out), python_model=ChampionModel(), artifacts=artifacts,
        # explicit, so MLflow does not infer (slowly) what the environment holds
        pip_requirements=[f"mlflow=={mlflow.__version__}", "torch", "transformers", "peft", "openai", "tuneloop"],
    )
    return out
