"""deployments/prefect.yaml (workers, an existing server, Prefect Cloud) and `tuneloop serve` (one machine)
declare the same deployments: same flows, schedules, concurrency and triggers. Compared without a server."""

from __future__ import annotations

from pathlib import Path

import yaml

from conftest import DEMO_CONFIG, ROOT


def declared_in_yaml() -> dict[str, dict]:
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    out = {}
    for d in spec["deployments"]:
        limit = d.get("concurrency_limit")
        out[d["name"]] = {
            "entrypoint": d["entrypoint"].replace(":", "."),
            "schedules": [(s["cron"], s.get("timezone", "UTC")) for s in d.get("schedules", [])],
            "concurrency": (limit["limit"], limit["collision_strategy"]) if isinstance(limit, dict) else limit,
            "triggers": sorted((t["name"], tuple(sorted(t["expect"])), tuple(sorted(t["match"].items())),
                                t["parameters"]["reason"]["template"]) for t in d.get("triggers", [])),
            "config": d.get("parameters", {}).get("config"),
        }
    return out


def declared_by_serve() -> dict[str, dict]:
    from tuneloop.app.serve import build_deployments

    _, deployments = build_deployments(DEMO_CONFIG, [])
    out = {}
    for d in deployments:
        options = d.concurrency_options
        out[d.name] = {
            "entrypoint": d.entrypoint,
            "schedules": [(s.schedule.cron, s.schedule.timezone) for s in d.schedules],
            "concurrency": (d.concurrency_limit, options.collision_strategy.value) if options else d.concurrency_limit,
            "triggers": sorted((t.name, tuple(sorted(t.expect)), tuple(sorted(t.match.root.items())),
                                t.parameters["reason"]["template"]) for t in d.triggers),
            "config": d.parameters["config"],
        }
    return out


def differences(from_yaml: dict[str, dict], from_serve: dict[str, dict]) -> list[str]:
    """What one side declares differently from the other, for the deployments serve makes."""
    found = []
    for name, served in from_serve.items():
        yaml_side = dict(from_yaml.get(name, {}))
        served = dict(served)
        # the yaml names the config relative to the repo root; serve passes the absolute path it was given
        if (ROOT / str(yaml_side.pop("config", ""))).resolve() != Path(served.pop("config")).resolve():
            found.append(f"{name}: config")
        found += [f"{name}: {key}" for key in sorted(set(yaml_side) | set(served))
                  if yaml_side.get(key) != served.get(key)]
    return found


def test_prefect_yaml_and_tuneloop_serve_declare_the_same_deployments():
    from_yaml, from_serve = declared_in_yaml(), declared_by_serve()
    assert set(from_serve) == {"retrain", "drift-monitor"}
    assert set(from_yaml) == {"retrain", "drift-monitor", "train-local"}  # serve deploys train-local from the yaml
    assert differences(from_yaml, from_serve) == []
    assert from_yaml["train-local"]["entrypoint"] == "tuneloop.flows.train_local.train_local"


def test_the_comparison_sees_a_changed_schedule_and_a_dropped_trigger():
    """The check can fail: a served schedule or trigger set that differs from the yaml's is reported."""
    from_serve = declared_by_serve()
    from_serve["retrain"] = {**from_serve["retrain"], "schedules": [("0 4 * * 1", "UTC")],
                             "triggers": from_serve["retrain"]["triggers"][:1]}
    assert differences(declared_in_yaml(), from_serve) == ["retrain: schedules", "retrain: triggers"]
