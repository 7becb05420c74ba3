"""Hyper-parameter presets, one `ml_collections` file per stage.

Each file's `get_config(preset)` returns the whole configuration of a run for one of
`PRESETS`: `paper` (GeneFace's sizes and schedule), `cpu` (the documented CPU
configuration every measured figure here was trained with) and `tiny` (smoke runs, tests
and notebooks). Entry points read them with `ml_collections.config_flags`:

  python -m experiments.train_syncnet --config=cpu ...               # a preset by name
  python -m experiments.train_syncnet --config=cpu --config.model.base=64
  python -m experiments.train_syncnet --config=path/to/mine.py:paper  # any config file

`config.run` holds run controls (steps, logging, checkpoint and evaluation intervals):
a run resumes with other run controls, but not with another model, optimiser or data
setting (`train.loop.prepare_workdir`).
"""

PRESETS = ("paper", "cpu", "tiny")


def check_preset(preset, name):
    """The preset argument of `name`'s get_config, `paper` when empty; ValueError if unknown."""
    preset = preset or "paper"
    if preset not in PRESETS:
        raise ValueError(f"{name}: unknown preset {preset!r} (expected one of {PRESETS})")
    return preset
