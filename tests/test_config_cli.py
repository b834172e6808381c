from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from slim_ray.cli import app
from slim_ray.config import Config, RayConfig, load_config
from slim_ray.errors import ConfigError
from slim_ray.ray_session import ray_session, resolve_address

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_default_yaml_loads_and_keeps_model_defaults_for_data():
    cfg = load_config(REPO / "configs" / "ml100k.yaml")
    # the split protocol is the library's (RecBole's); only the demo's rationale budget differs
    assert cfg.data == Config().data.model_copy(update={"checkpoints_per_user": 1, "checkpoint_stride": 1})
    assert cfg.run == Config().run
    assert cfg.train.backbone == "SASRec" and cfg.train.epochs == 50 and cfg.train.cpus_per_worker == 2
    assert cfg.train.objective == "all_positions" and cfg.train.patience == 5  # the demo trains to early stopping


def test_overrides_parse_yaml_values(tmp_path):
    cfg = load_config(REPO / "configs" / "ml100k.yaml",
                      ["data.kcore=5", "data.rating_threshold=3.5", "run.output_dir=/x/y", "ray.num_cpus=null"])
    assert cfg.data.kcore == 5 and cfg.data.rating_threshold == 3.5
    assert cfg.run.output_dir == Path("/x/y") and cfg.ray.num_cpus is None
    assert cfg.prepared_dir == Path("/x/y/prepared")


@pytest.mark.parametrize("override, message", [
    ("data.kcroe=5", r"config field data.kcroe: Extra inputs are not permitted"),
    ("data.kcore=many", r"config field data.kcore: Input should be a valid integer"),
    ("data.format=csv", r"config field data.format: Input should be 'recbole'"),
    ("data.min_seq_len=2", r"config field data.min_seq_len: Input should be greater than or equal to 3"),
    ("kcore", r"expected section.key=value"),
    ("data=3", r"config field data: Input should be a valid dictionary"),
])
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  kcore: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid YAML"):
        load_config(bad)
    bad.write_text("data:\n  shuffle: true\n")
    with pytest.raises(ConfigError, match=r"config field data.shuffle: Extra inputs .*bad.yaml"):
        load_config(bad)


def test_help_explains_every_option():
    """Each command's options are generated from the config sections it reads: every field of them,
    with its description as help; the flags become --set overrides of higher precedence."""
    from slim_ray.cli import config_fields

    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0 and all(c in top.output for c in ("prepare", "train", "evaluate", "pipeline"))
    out = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "250"}).output
    keys = [key for key, _ in config_fields(type(Config().train), "train")]
    assert len(keys) > 30 and all(f"--{key} " in out for key in keys), [k for k in keys if f"--{k} " not in out]
    assert "--resume" in out and "Ray Train workers." in out and "--teacher.base_url" not in out
    pipeline_help = runner.invoke(app, ["pipeline", "--help"], env={"COLUMNS": "250"}).output
    every = [key for section, field in Config.model_fields.items() for key, _ in config_fields(field.annotation, section)]
    assert all(f"--{key} " in pipeline_help for key in every), [k for k in every if f"--{k} " not in pipeline_help]
    shown = runner.invoke(app, ["show-config", "--set", "train.epochs=7", "--train.epochs", "9",
                                "--train.model", "{hidden_dropout: 0.3}", "--data.kcore=4"])
    assert shown.exit_code == 0, shown.output
    assert "epochs: 9" in shown.output and "hidden_dropout: 0.3" in shown.output and "kcore: 4" in shown.output
    bad = runner.invoke(app, ["show-config", "--train.zero_stage", "7"])
    assert bad.exit_code == 2 and "train.zero_stage" in bad.output


def test_cli_prepare_and_one_line_errors(recbole_files, tmp_path):
    inter, item = recbole_files
    ok = runner.invoke(app, ["prepare", "--data.interactions", str(inter), "--data.items", str(item),
                             "--run.output_dir", str(tmp_path / "run"), "--set", "data.max_len=2"])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "run" / "prepared" / "sequences.parquet").is_file()
    assert "interactions" in ok.output

    bad = runner.invoke(app, ["prepare", "--data.interactions", str(tmp_path / "x.inter"),
                              "--data.items", str(item), "--run.output_dir", str(tmp_path / "run2")])
    assert bad.exit_code == 2
    assert "error: data.interactions: file not found" in bad.output
    assert "Traceback" not in bad.output
    assert not (tmp_path / "run2").exists()

    unknown = runner.invoke(app, ["prepare", "--set", "data.shuffle=1"])
    assert unknown.exit_code == 2 and "data.shuffle" in unknown.output
    assert runner.invoke(app, ["prepare", "--no-such-flag"]).exit_code == 2
    assert runner.invoke(app, ["prepare", "--train.epochs", "3"]).exit_code == 2  # prepare does not read train


def test_ray_address_resolution(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(RayConfig()) is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert resolve_address(RayConfig()) == "10.0.0.5:6379"
    assert resolve_address(RayConfig(address="head:6379")) == "head:6379"
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    with pytest.raises(ConfigError, match="'auto' is not accepted"):
        resolve_address(RayConfig())


def test_local_ray_session_starts_and_stops(monkeypatch, tmp_path):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with ray_session(RayConfig(num_cpus=2, object_store_memory_mb=100)) as info:
        assert info["local"] and ray.cluster_resources()["CPU"] == 2
        assert ray.get(ray.remote(lambda: __import__("os").environ["HF_HUB_OFFLINE"]).remote()) == "1"
    assert not ray.is_initialized()
