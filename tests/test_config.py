from pathlib import Path

import pytest

from tuneloop.core.config import DEFAULT_CONFIG, PipelineConfig, load_config, parse_override
from tuneloop.core.records import TuneloopError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(text, encoding="utf-8")
    return path


MINIMAL = "evaluate:\n  holdout: data/holdout.jsonl\n"


def test_demo_config_loads_with_paths_relative_to_the_file():
    cfg = load_config(DEFAULT_CONFIG)
    root = DEFAULT_CONFIG.parent.parent
    assert cfg.evaluate.holdout == root / "data" / "demo" / "holdout.jsonl"
    assert cfg.quality.suite == root / "expectations" / "raw_records.json"
    assert cfg.train.tiny.corpus == [root / "data" / "demo" / "tickets.jsonl"]
    assert cfg.registry.model_name == "lumenfold-support"


def test_relative_paths_follow_the_config_file_not_the_working_directory(tmp_path, monkeypatch):
    path = write(tmp_path, MINIMAL)
    monkeypatch.chdir("/")
    assert load_config(path).evaluate.holdout == tmp_path / "data" / "holdout.jsonl"


def test_unknown_key_is_refused_naming_file_and_dotted_key(tmp_path):
    path = write(tmp_path, MINIMAL + "train:\n  local:\n    max_stepz: 3\n")
    with pytest.raises(TuneloopError) as err:
        load_config(path)
    assert f"{path}: train.local.max_stepz: unknown key" in str(err.value)


def test_wrong_type_is_refused_naming_the_key(tmp_path):
    path = write(tmp_path, MINIMAL + "train:\n  local:\n    max_steps: many\n")
    with pytest.raises(TuneloopError) as err:
        load_config(path)
    assert f"{path}: train.local.max_steps:" in str(err.value)
    assert "integer" in str(err.value)


def test_missing_required_section_is_named(tmp_path):
    with pytest.raises(TuneloopError, match="evaluate: Field required"):
        load_config(write(tmp_path, "name: x\n"))


def test_overrides_apply_on_top_with_yaml_types(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["train.local.max_steps=20", "quality.pii=quarantine",
                                                 "register.min_improvement=0.01", "source.patterns=['*.csv']"])
    assert cfg.train.local.max_steps == 20
    assert cfg.quality.pii == "quarantine"
    assert cfg.registry.min_improvement == 0.01
    assert cfg.source.patterns == ["*.csv"]


def test_override_of_unknown_key_is_blamed_on_the_override(tmp_path):
    with pytest.raises(TuneloopError) as err:
        load_config(write(tmp_path, MINIMAL), ["train.local.max_stepz=20"])
    assert "--set train.local.max_stepz: train.local.max_stepz: unknown key" in str(err.value)


@pytest.mark.parametrize("bad", ["train.local.max_steps", "=3", "a..b=1"])
def test_malformed_override_is_refused(bad):
    with pytest.raises(TuneloopError, match="expected KEY=VALUE"):
        parse_override(bad)


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "evaluate:\n  holdout: [unclosed\nname: x\n")
    with pytest.raises(TuneloopError, match=rf"{path}:\d+: not valid YAML"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(TuneloopError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_config_round_trips_through_json_as_a_flow_parameter_would():
    cfg = load_config(DEFAULT_CONFIG)
    again = PipelineConfig.model_validate_json(cfg.model_dump_json(by_alias=True))
    assert again == cfg
    assert again.config_hash() == cfg.config_hash()


def test_sql_source_is_chosen_by_kind_and_folder_is_the_default(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL + "source:\n  kind: sql\n  url: sqlite:///x.db\n  table: tickets\n"))
    assert cfg.source.kind == "sql" and cfg.source.watermark == "updated_at"
    assert load_config(write(tmp_path, MINIMAL + "source:\n  patterns: ['*.csv']\n")).source.kind == "folder"
    with pytest.raises(TuneloopError, match="source.sql: Value error, set exactly one of source.table and source.query"):
        load_config(write(tmp_path, MINIMAL + "source:\n  kind: sql\n  url: sqlite://\n"))
