"""Presets as config files (`experiments/configs/`), the `--config` flag and the workdir's
configuration check."""

import importlib
import json
import pathlib
import subprocess
import sys

import pytest

from conftest import REPO

# The stages' files (presets paper, cpu, tiny); the demo's has its own presets.
CONFIG_FILES = sorted(p.stem for p in (REPO / "experiments" / "configs").glob("*.py")
                      if p.stem not in ("__init__", "demo"))


@pytest.mark.parametrize("stage", CONFIG_FILES)
def test_every_preset_loads_and_tiny_is_small(stage):
    module = importlib.import_module(f"experiments.configs.{stage}")
    configs = {p: module.get_config(p) for p in ("paper", "cpu", "tiny")}
    assert module.get_config("").to_dict() == configs["paper"].to_dict()
    for c in configs.values():
        assert c.run.steps > 0 and "model" in c
    assert configs["tiny"].run.steps < configs["cpu"].run.steps <= configs["paper"].run.steps
    with pytest.raises(ValueError, match="unknown preset"):
        module.get_config("small")


def test_demo_presets_name_stage_presets():
    from experiments.configs import demo, syncnet
    configs = {p: demo.get_config(p) for p in demo.PRESETS}
    assert demo.get_config("").to_dict() == configs["cpu"].to_dict()
    for c in configs.values():
        syncnet.get_config(c.stage_preset)               # a preset every stage file has
    sizes = [configs[p].person.size for p in ("tiny", "quick", "cpu")]
    assert sizes == sorted(sizes) and configs["cpu"].eval_frames == 0      # all frames
    with pytest.raises(ValueError, match="unknown preset"):
        demo.get_config("paper")


def test_workdir_accepts_other_run_controls_and_refuses_another_model(tmp_path):
    from geneface_jax.errors import CheckpointError
    from geneface_jax.train.loop import prepare_workdir
    cfg = dict(stage="x", model=dict(width=8), run=dict(steps=10))
    prepare_workdir(tmp_path, cfg)
    prepare_workdir(tmp_path, dict(cfg, run=dict(steps=20)))           # resume, longer
    assert json.loads((tmp_path / "config.json").read_text())["run"] == {"steps": 20}
    with pytest.raises(CheckpointError, match=r"differs in \['model'\]"):
        prepare_workdir(tmp_path, dict(cfg, model=dict(width=16)))


@pytest.mark.parametrize("args, message", [
    (["--config=small"], "unknown preset 'small'"),
    (["--config=tiny", "--config.model.nope=1"], "no such key"),
    (["--config=tiny", "--config.model.base=abc"], "invalid literal"),
    (["--config=/no/such/file.py:cpu"], "No such file"),
])
def test_bad_config_is_one_error_line(tmp_path, args, message):
    work = tmp_path / "w"
    p = subprocess.run([sys.executable, "-m", "experiments.train_syncnet",
                        f"--data={tmp_path}", f"--workdir={work}", *args], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("error: --config:") and message in p.stderr
    assert "Traceback" not in p.stderr and not pathlib.Path(work).exists()
