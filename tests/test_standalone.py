"""The project stands alone: a copy of the repository with nothing beside it, and a
non-editable install used from outside the source tree, both build a synthetic corpus from
the speech clips shipped inside the package."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

CLIP_NAMES = ["de.wav", "en_gb_female.wav", "en_us_male.wav", "zh_cmn.wav"]
# The smallest corpus the command builds: 2 utterances of 2 speakers, one held out.
TINY_CORPUS = ("--kind=corpus", "--utterances=2", "--speakers=2", "--held_out_speakers=1",
               "--tfds=false", "--progress=false")


def _env():
    """The test's environment without the speech-directory override."""
    env = dict(os.environ)
    env.pop("GENEFACE_SPEECH_DIR", None)
    env.pop("PYTHONPATH", None)
    return env


def _repo_files():
    """The repository's files as a clone has them: tracked and untracked-not-ignored."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                          "-z"], cwd=REPO, capture_output=True, check=True)
    return [p for p in out.stdout.decode().split("\0") if p and (REPO / p).is_file()]


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory):
    """A copy of the repository in a fresh temporary directory: no `shared/` beside it."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    root = tmp_path_factory.mktemp("standalone") / "geneface-jax"
    for rel in _repo_files():
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest)
    assert not (root.parent / "shared").exists()
    return root


def _check_corpus(out_dir, stdout):
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["kind"] == "corpus" and summary["num_utterances"] == 2
    assert summary["num_frames"] > 25
    assert (out_dir / "summary.json").is_file()


def test_clips_ship_in_the_package():
    from geneface_jax.data.synthetic import speech
    assert sorted(p.name for p in speech.PACKAGED_SPEECH_DIR.glob("*.wav")) == CLIP_NAMES
    assert "GENEFACE_SPEECH_DIR" in os.environ or (
        speech.default_speech_dir() == speech.PACKAGED_SPEECH_DIR)
    assert all(len(c) > 16000 for c in speech.load_clips(speech.PACKAGED_SPEECH_DIR))


def test_nothing_reads_the_shared_directory():
    needle = "../" + "shared"             # spelt apart so that this file does not match
    offenders = [rel for rel in _repo_files()
                 if rel.endswith((".py", ".ipynb", ".cfg", ".toml", ".md", ".sh"))
                 and needle in (REPO / rel).read_text(errors="ignore")]
    assert offenders == []


def test_speech_dir_override_is_checked(tmp_path, monkeypatch):
    from geneface_jax.data.synthetic import speech
    from geneface_jax.errors import DatasetError
    monkeypatch.setenv("GENEFACE_SPEECH_DIR", str(tmp_path))
    with pytest.raises(DatasetError, match="GENEFACE_SPEECH_DIR"):
        speech.default_speech_dir()
    shutil.copy2(speech.PACKAGED_SPEECH_DIR / "de.wav", tmp_path / "x.wav")
    assert speech.default_speech_dir() == tmp_path
    assert len(speech.load_clips()) == 1


def test_corpus_from_a_repository_copy(repo_copy, tmp_path):
    env = _env()
    where = subprocess.run(
        [sys.executable, "-c", "from geneface_jax.data.synthetic import speech; "
         "print(speech.default_speech_dir())"],
        cwd=repo_copy, env=env, capture_output=True, text=True, check=True)
    assert pathlib.Path(where.stdout.strip()).is_relative_to(repo_copy)
    out = tmp_path / "corpus"
    run = subprocess.run([sys.executable, "-m", "experiments.make_dataset", *TINY_CORPUS,
                          f"--out={out}"], cwd=repo_copy, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    _check_corpus(out, run.stdout)


def test_non_editable_install_builds_a_corpus(repo_copy, tmp_path):
    """`pip install .` (a wheel, not editable) into a fresh virtual environment; the corpus
    is built from a directory outside any source tree. The environment sees this Python's
    packages (`--system-site-packages`) so nothing is downloaded; the package itself must
    come from the venv, which the test checks."""
    env = _env()
    src, wheels = tmp_path / "src", tmp_path / "wheels"
    shutil.copytree(repo_copy, src)        # pip builds in the source tree: keep it apart
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                            "--no-build-isolation", "-w", str(wheels), str(src)],
                           env=env, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    shutil.rmtree(src)                     # nothing of the source tree is left to import
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps",
                              "--no-index", *map(str, wheels.glob("*.whl"))],
                             env=env, capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run(
        [str(python), "-c", "import geneface_jax, experiments; "
         "from geneface_jax.data.synthetic import speech; "
         "print(geneface_jax.__file__); print(experiments.__file__); "
         "print(speech.default_speech_dir())"],
        cwd=work, env=env, capture_output=True, text=True, check=True)
    paths = [pathlib.Path(p) for p in where.stdout.split()]
    assert all(p.is_relative_to(venv) for p in paths), paths
    out = work / "corpus"
    run = subprocess.run([str(python), "-m", "experiments.make_dataset", *TINY_CORPUS,
                          f"--out={out}"], cwd=work, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    _check_corpus(out, run.stdout)
