"""Test configuration: 8 simulated CPU devices so multi-device behaviour is checked.

The flag must be set before JAX initialises its backend; single-device tests simply use
`jax.devices()[:1]`.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SPEECH_DIR = REPO.parent / "shared" / "data" / "speech"


@pytest.fixture(scope="session")
def speech_dir():
    """Directory of the shipped 16 kHz mono speech clips (../shared/data/speech)."""
    if not SPEECH_DIR.is_dir():
        pytest.skip(f"speech clips not found at {SPEECH_DIR}")
    return SPEECH_DIR
