"""Azure deployments through Microsoft's real SDK against a fake ARM over TLS (tests/fake_azure.py), with the
Azure OpenAI data plane faked by FakeOpenAI: a chat to a name not deployed on the fake ARM is a 404
DeploymentNotFound, as on Azure. Evaluation and registration run as stages on a real MLflow registry."""

import json
import os
import subprocess
import sys

import pytest
from fake_azure import FakeAzure
from fake_openai import FakeOpenAI, exported_files

from conftest import DEMO, DEMO_CONFIG, ROOT
from tuneloop.core.config import load_config
from tuneloop.core.records import ApiModel, TuneloopError

TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.PLANTED-arm-token.0123456789abcdef"
KEY = "azure-data-plane-key-PLANTED-0123456789"
BASE = "gpt-4o-mini-2024-07-18"
GOOD, BAD, BEST = (f"{BASE}.ft-{x}" for x in ("good", "bad", "best"))  # Azure's fine-tuned model ids
N = 8


def demo_labels() -> dict[str, str]:
    rows = [json.loads(line) for line in (DEMO / "holdout.jsonl").read_text().splitlines()[:N]]
    return {f"Subject: {r['subject']}\n\n{r['body']}": r["queue"] for r in rows}


class Answers:
    """The fake chat model: BEST is always right, GOOD right on half the tickets, BAD never, the base model
    chats. Records which candidate deployments existed each time a candidate answered."""

    def __init__(self, arm: FakeAzure):
        self.arm, self.labels = arm, demo_labels()
        self.order = list(self.labels)
        self.candidates_seen: list[list[str]] = []

    def __call__(self, model: str, messages: list[dict]) -> str:
        text = messages[-1]["content"]
        if model in (BAD, BEST) or model.startswith(f"{BASE}.ft-new"):
            self.candidates_seen.append(sorted(n for n in self.arm.deployments if n.startswith("tuneloop-candidate-")))
        right = (model == BEST or (model == GOOD and self.order.index(text) < N // 2))
        if ".ft-" not in model:
            return "Hello! How can I help?"
        return f"queue: {self.labels[text]}" if right else "queue: nowhere"


@pytest.fixture
def azure(monkeypatch, home, tmp_path):
    """A fake ARM holding the base model's deployment and two others, the fake data plane linked to it, and a
    pipeline config that manages deployments there."""
    monkeypatch.setenv("ARM_TOKEN", TOKEN)
    monkeypatch.setenv("AZURE_OPENAI_KEY", KEY)
    with FakeAzure(TOKEN) as arm, FakeOpenAI() as api:
        arm.trust(monkeypatch)
        answers = Answers(arm)
        api.answer, api.deployed, api.valid_key = answers, arm.serving, KEY
        for name, model in ((BASE, BASE), ("tuneloop-candidate-ftjob-left", f"{BASE}.ft-left"), ("billing-bot", GOOD)):
            arm.put(name, {"sku": {"name": "Standard", "capacity": 1},
                           "properties": {"model": {"format": "OpenAI", "name": model, "version": "1"}}}, name)
            arm.deployments[name]["properties"]["provisioningState"] = "Succeeded"
        overrides = [
            "train.backend=openai", "train.openai.provider=azure", f"train.openai.azure_endpoint={api.base_url[:-3]}",
            "train.openai.api_key_env=AZURE_OPENAI_KEY", "train.openai.request_retries=0",
            f"train.openai.azure_deployments={json.dumps(arm.settings(token_env='ARM_TOKEN'))}",
            f"evaluate.max_examples={N}", "register.model_name=support",
            f"register.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
        yield arm, api, answers, load_config(DEMO_CONFIG, overrides), overrides


def candidate(model: str, job: str) -> ApiModel:
    return ApiModel(base_model=BASE, fine_tuned_model=model, job_id=job, dataset_version=job,
                    steps=4, train_loss=0.1, train_seconds=1.0)


def evaluate_and_register(cfg, trained, tmp_path, warnings):
    from tuneloop.core.state import StateLayout
    from tuneloop.lib.heldout import read_heldout
    from tuneloop.lib.registry import ModelRegistry
    from tuneloop.lib.run_context import RunContext
    from tuneloop.tasks.evaluate import evaluate_models
    from tuneloop.tasks.register import register_candidate

    uri = cfg.registry.tracking_uri
    run_dir = tmp_path / trained.job_id
    run_dir.mkdir()
    ctx = RunContext(StateLayout(tmp_path), run_dir, "", ModelRegistry(uri, cfg.registry.model_name))
    champion = ctx.registry.download_champion(run_dir / "champion")
    heldout = read_heldout(cfg.evaluate.holdout, cfg.mapping, cfg.evaluate.max_examples)
    report = evaluate_models(trained, champion, heldout, cfg.evaluate, run_dir, cfg.train.openai, warn=warnings.append)
    mv = register_candidate(ctx, cfg, None, exported_files(run_dir), trained, report)
    return report, mv


def served(arm: FakeAzure, name: str) -> tuple[str, str, str]:
    d = arm.deployments[name]
    return d["properties"]["model"]["name"], d["sku"]["name"], d["properties"]["provisioningState"]


def test_candidates_are_deployed_one_each_and_the_champion_deployment_follows_promotions_and_rollbacks(
        azure, tmp_path):
    import mlflow.pyfunc
    from mlflow import MlflowClient

    from tuneloop.core.openai_client import chat_completions
    from tuneloop.lib.registry import ModelRegistry

    arm, api, answers, cfg, overrides = azure
    assert cfg.train.openai.azure_deployments.champion_deployment == "support-champion"  # from register.model_name
    warnings: list[str] = []

    # 1. the first candidate beats the base: deployed on the Developer tier, then it takes over the champion's
    #    deployment (created, Standard) and its own deployment goes; the deployment an earlier run left went first
    report, mv = evaluate_and_register(cfg, candidate(GOOD, "ftjob-1"), tmp_path, warnings)
    assert report.base.accuracy == 0.0 and report.candidate.accuracy == 0.5 and mv.decision.promoted
    assert set(arm.calls("DELETE")) == {"tuneloop-candidate-ftjob-left", "tuneloop-candidate-ftjob-1"}
    puts = [(m, json.loads(body)["sku"]["name"]) for m, path, _, body in arm.requests if m == "PUT"]
    assert [s for _, s in puts] == ["DeveloperTier", "Standard"]  # the candidate's, then the champion's
    assert served(arm, "support-champion") == (GOOD, "Standard", "Succeeded")
    assert sorted(arm.deployments) == sorted([BASE, "billing-bot", "support-champion"])  # others' kept

    # 2. a worse candidate: exactly one deployment exists for it while it answers, the champion answers through
    #    the champion's deployment, and the rejected candidate leaves no deployment behind
    report, mv = evaluate_and_register(cfg, candidate(BAD, "ftjob-2"), tmp_path, warnings)
    assert not mv.decision.promoted and report.champion.accuracy == 0.5 and report.candidate.accuracy == 0.0
    assert answers.candidates_seen and all(seen == ["tuneloop-candidate-ftjob-2"] for seen in answers.candidates_seen)
    chats = [path for m, path, _, _ in api.requests if m == "POST" and "/chat/completions" in path]
    assert any("/deployments/support-champion/" in p for p in chats) and any(f"/deployments/{BASE}/" in p for p in chats)
    assert "tuneloop-candidate-ftjob-2" not in arm.deployments and served(arm, "support-champion")[0] == GOOD
    with pytest.raises(TuneloopError, match="HTTP 404 DeploymentNotFound"):  # the data plane knows it is gone
        chat_completions(cfg.train.openai, "tuneloop-candidate-ftjob-2", [[{"role": "user", "content": "hi"}]], 5)

    # 3. someone pointed the champion's deployment elsewhere: the evaluation points it back at the registry's
    #    champion before scoring it. The Developer tier refused for this model: Standard, with a warning.
    #    Promoted, the champion's deployment is re-pointed in place (its SKU kept), never deleted
    arm.deployments["support-champion"]["properties"]["model"]["name"] = f"{BASE}.ft-by-hand"
    arm.refuse_skus.add("DeveloperTier")
    report, mv = evaluate_and_register(cfg, candidate(BEST, "ftjob-3"), tmp_path, warnings)
    assert report.champion.accuracy == 0.5 and mv.decision.promoted and mv.version == "3"
    assert any(f"serves {BASE}.ft-by-hand (Succeeded), not the registry's champion {GOOD}: re-pointing" in w
               for w in warnings)
    (fallback,) = [w for w in warnings if "DeveloperTier" in w]
    assert "SKU 'DeveloperTier'" in fallback and "deploying the candidate as Standard instead" in fallback
    assert served(arm, "support-champion") == (BEST, "Standard", "Succeeded")
    assert "support-champion" not in arm.calls("DELETE") and not any(
        n.startswith("tuneloop-candidate-") for n in arm.deployments)

    # the registered pyfunc answers through the champion's deployment
    mlflow.set_tracking_uri(cfg.registry.tracking_uri)
    loaded = mlflow.pyfunc.load_model("models:/support@champion")
    ticket = answers.order[-1]
    assert loaded.predict([ticket]) == [f"queue: {answers.labels[ticket]}"]
    assert "/deployments/support-champion/chat/completions" in api.requests[-1][1]

    # 4. promote and rollback re-point it before the alias moves; the CLI passes the config's settings
    ModelRegistry(cfg.registry.tracking_uri, "support").promote("2", "test", "try it", cfg.train.openai)
    assert served(arm, "support-champion")[0] == BAD
    env = {"TUNELOOP_HOME": os.environ["TUNELOOP_HOME"], "PATH": "", "DO_NOT_TRACK": "true",
           "MLFLOW_DISABLE_TELEMETRY": "true", "ARM_TOKEN": TOKEN, "REQUESTS_CA_BUNDLE": str(arm.ca_file)}
    out = subprocess.run([sys.executable, "-m", "tuneloop.app.cli", "rollback", "--reason", "complaints",
                          "--config", str(DEMO_CONFIG), *(a for o in overrides for a in ("--set", o))],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "rolled back from version 2 to version 3" in out.stdout and served(arm, "support-champion")[0] == BEST
    ModelRegistry(cfg.registry.tracking_uri, "support").rollback("test", "older", cfg.train.openai)
    assert served(arm, "support-champion")[0] == GOOD
    client = MlflowClient(cfg.registry.tracking_uri)
    assert str(client.get_model_version_by_alias("support", "champion").version) == "1"
    assert "support-champion" not in arm.calls("DELETE")

    # every ARM request carried the token, and it is in no MLflow param, tag or file, nor the CLI's output
    assert all(h.get("Authorization") == f"Bearer {TOKEN}" for _, _, h, _ in arm.requests)
    runs = client.search_runs([client.get_experiment_by_name(cfg.registry.experiment).experiment_id])
    stored = json.dumps([[r.data.params, r.data.tags] for r in runs]
                        + [v.tags for v in client.search_model_versions("name='support'")])
    assert len(runs) == 3 and TOKEN not in stored and "PLANTED" not in stored
    files = [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".db"]
    assert files and not any(b"PLANTED" in blob for blob in files)
    assert "PLANTED" not in out.stdout + out.stderr + "".join(warnings)


def test_a_failed_provisioning_or_a_refused_token_is_one_line_without_the_token(azure, tmp_path, monkeypatch):
    from tuneloop.lib.azure_deploy import list_deployments

    arm, api, answers, cfg, _ = azure
    arm.fail_models.add(BAD)
    with pytest.raises(TuneloopError) as failed:
        evaluate_and_register(cfg, candidate(BAD, "ftjob-9"), tmp_path, [])
    message = str(failed.value)
    assert message.startswith(f"azure deployments: deploying {BAD} as tuneloop-candidate-ftjob-9 (DeveloperTier) "
                              "on account acct ended in provisioningState Failed")
    assert "fix the cause and rerun" in message and "\n" not in message
    assert answers.candidates_seen == []  # the failed candidate was never asked

    wrong = "eyJhbGciOiJub25lIn0.PLANTED-stale-token.abcdef0123456789"
    monkeypatch.setenv("ARM_TOKEN", wrong)
    with pytest.raises(TuneloopError) as refused:
        list_deployments(cfg.train.openai.azure_deployments)
    message = str(refused.value)
    assert "HTTP 401 InvalidAuthenticationToken" in message and "check the token in $ARM_TOKEN" in message
    assert wrong in arm.requests[-1][2]["Authorization"]  # sent, and echoed back by the fake ...
    assert "PLANTED" not in message and "\n" not in message  # ... but never shown


def test_preflight_names_the_extra_and_the_settings_need_azure(azure, monkeypatch):
    from tuneloop.tasks.preflight import preflight

    arm, api, answers, cfg, overrides = azure
    assert preflight(cfg) == []
    monkeypatch.setitem(sys.modules, "azure.mgmt.cognitiveservices", None)  # as if the extra were not installed
    assert "train.openai.azure_deployments is set, but azure.mgmt.cognitiveservices is not installed: pip install " \
           "'tuneloop[azure]'" in preflight(cfg)
    with pytest.raises(TuneloopError, match="azure_deployments needs train.openai.provider: azure"):
        load_config(DEMO_CONFIG, [o for o in overrides if "provider" not in o])
    with pytest.raises(TuneloopError, match="'support bot' is not an Azure deployment name .* e.g. 'support-bot'"):
        load_config(DEMO_CONFIG, [*overrides, "train.openai.azure_deployments.champion_deployment=support bot"])
    assert "train.openai.azure_deployments.account" not in cfg.model_settings()  # where it runs, not what it trains
