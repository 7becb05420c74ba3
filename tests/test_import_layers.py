"""Imports run one way (docs/architecture.md, "Layers"; contracts in pyproject.toml)."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_inference_loads_no_training_code_and_no_optax():
    """`import geneface_jax.pipeline`, and the modules its loading and synthesis import
    lazily, bring in neither `geneface_jax.train` nor optax."""
    code = ("import sys, geneface_jax.pipeline, geneface_jax.motion.predict, "
            "geneface_jax.render.frames, geneface_jax.audio.hubert, geneface_jax.data.video\n"
            "bad = sorted(m for m in sys.modules if m == 'optax' or m.startswith('optax.') "
            "or m.startswith('geneface_jax.train'))\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_import_contracts_are_kept():
    """`lint-imports` (import-linter) keeps every contract of pyproject.toml."""
    pytest.importorskip("importlinter")
    proc = subprocess.run([sys.executable, "-c",
                           "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout
