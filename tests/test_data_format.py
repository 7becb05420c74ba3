"""Dataset formats: write/load round trips, TFDS array_record round trips, bad input."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from geneface_jax.data import format as fmt
from geneface_jax.data import tfds_builders
from geneface_jax.data.synthetic import world
from geneface_jax.errors import DatasetError

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def person_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "person"
    arrays, meta, wav = world.make_person(11, size=32, num_frames=20, progress=False)
    fmt.write_person(out, arrays, meta, wav)
    return out, arrays, meta, wav


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "corpus"
    arrays, meta = world.make_corpus(12, num_utterances=8, num_speakers=3,
                                     held_out_speakers=1, seconds=(2.0, 2.5),
                                     progress=False)
    fmt.write_corpus(out, arrays, meta)
    return out, arrays, meta


def test_person_write_load_round_trip(person_dir):
    out, arrays, meta, wav = person_dir
    ds = fmt.load_person(out)
    for name, arr in arrays.items():
        np.testing.assert_array_equal(ds[name], arr, err_msg=name)
    assert ds.num_frames == 20
    np.testing.assert_array_equal(ds.split("valid"), np.arange(18, 20))
    np.testing.assert_allclose(ds.audio(), wav, atol=1.0 / 32767)
    assert ds.meta["intrinsics"] == meta["intrinsics"]


def test_corpus_write_load_round_trip(corpus_dir):
    out, arrays, _ = corpus_dir
    c = fmt.load_corpus(out)
    assert len(c) == 8
    for name, arr in arrays.items():
        np.testing.assert_array_equal(c[name], arr, err_msg=name)
    u = c.utterance(3)
    spk, start, num, split = arrays["utterances"][3]
    assert u["speaker"] == spk and u["landmarks"].shape == (num, 68, 3)
    assert u["mel"].shape == (2 * num, 80) and u["audio"].shape == (640 * num,)
    all_ids = np.concatenate([c.split(s) for s in fmt.SPLITS])
    np.testing.assert_array_equal(np.sort(all_ids), np.arange(8))


def test_person_tfds_round_trip(person_dir, tmp_path):
    out, arrays, meta, _ = person_dir
    builder = tfds_builders.build("person", out, data_dir=tmp_path / "tfds")
    sources = builder.as_data_source()
    assert sorted(sources) == ["train", "valid"]
    rows = [sources["train"][i] for i in range(len(sources["train"]))]
    rows += [sources["valid"][i] for i in range(len(sources["valid"]))]
    assert [int(r["index"]) for r in rows] == list(range(20))
    pairs = dict(image="frames", mask="masks", landmarks="landmarks",
                 landmarks_2d="landmarks_2d", pose="poses", face_rect="face_rect",
                 blink="blink", oracle_open="oracle_open")
    for key, name in pairs.items():
        np.testing.assert_array_equal(np.stack([r[key] for r in rows]), arrays[name],
                                      err_msg=key)
    np.testing.assert_array_equal(np.concatenate([r["mel"] for r in rows]), arrays["mel"])
    md = builder.info.metadata
    np.testing.assert_array_equal(np.asarray(md["background"], np.uint8),
                                  arrays["background"])
    assert md["meta"]["intrinsics"] == meta["intrinsics"]
    # Built datasets are read again without rebuilding (TF-free random access).
    again = tfds_builders.data_sources("person", out, data_dir=tmp_path / "tfds")
    np.testing.assert_array_equal(again["valid"][1]["image"], arrays["frames"][19])


def test_corpus_tfds_round_trip(corpus_dir, tmp_path):
    out, arrays, _ = corpus_dir
    sources = tfds_builders.data_sources("corpus", out, data_dir=tmp_path / "tfds")
    seen = 0
    for split, source in sources.items():
        for i in range(len(source)):
            ex = source[i]
            idx = int(ex["index"])
            spk, start, num, sp = arrays["utterances"][idx]
            assert fmt.SPLITS[sp] == split and int(ex["speaker"]) == spk
            np.testing.assert_array_equal(ex["landmarks"], arrays["landmarks"][start:start + num])
            np.testing.assert_array_equal(ex["mel"], arrays["mel"][2 * start:2 * (start + num)])
            np.testing.assert_array_equal(ex["audio"],
                                          arrays["audio"][640 * start:640 * (start + num)])
            np.testing.assert_array_equal(ex["oracle_open"],
                                          arrays["oracle_open"][start:start + num])
            seen += 1
    assert seen == 8


def test_load_errors(tmp_path, person_dir, corpus_dir):
    out, arrays, meta, wav = person_dir
    with pytest.raises(DatasetError, match="does not exist"):
        fmt.load_person(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no meta.json"):
        fmt.load_person(tmp_path / "empty")
    with pytest.raises(DatasetError, match="expected 'geneface-person'"):
        fmt.load_person(corpus_dir[0])
    broken = tmp_path / "broken"
    fmt.write_person(broken, arrays, meta, wav)
    os.remove(broken / "poses.npy")
    with pytest.raises(DatasetError, match="missing array file poses.npy"):
        fmt.load_person(broken)
    np.save(broken / "poses.npy", np.zeros((19, 4, 4), np.float32))
    with pytest.raises(DatasetError, match="poses"):
        fmt.load_person(broken)


def test_write_errors_leave_nothing(tmp_path, person_dir, monkeypatch):
    _, arrays, meta, wav = person_dir
    bad = dict(arrays, landmarks=arrays["landmarks"][:, :60])
    with pytest.raises(DatasetError, match="landmarks"):
        fmt.write_person(tmp_path / "x", bad, meta, wav)
    with pytest.raises(DatasetError, match="samples"):
        fmt.write_person(tmp_path / "x", arrays, meta, wav[:-10])
    # An interrupted write leaves neither the output nor a temporary directory.
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)

    real_save = np.save
    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        fmt.write_person(tmp_path / "y", arrays, meta, wav)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # A non-empty destination is refused unless overwriting.
    fmt.write_person(tmp_path / "z", arrays, meta, wav)
    with pytest.raises(DatasetError, match="not empty"):
        fmt.write_person(tmp_path / "z", arrays, meta, wav)
    fmt.write_person(tmp_path / "z", arrays, meta, wav, overwrite=True)


def _run_make_dataset(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "experiments.make_dataset", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_make_dataset_cli(tmp_path):
    out = tmp_path / "p"
    res = _run_make_dataset("--kind=person", f"--out={out}", "--seed=3", "--size=32",
                            "--frames=12", "--noprogress", f"--workdir={tmp_path / 'w'}")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["num_frames"] == 12 and summary["height"] == 32
    assert json.loads((tmp_path / "w" / "metrics.json").read_text())["num_frames"] == 12
    assert (out / "tfds").is_dir()
    fmt.load_person(out)
    # Refusing to overwrite: clear message, exit 2, no traceback.
    res = _run_make_dataset("--kind=person", f"--out={out}", "--size=32", "--frames=12",
                            "--noprogress", "--notfds")
    assert res.returncode == 2
    assert "not empty" in res.stderr and "Traceback" not in res.stderr
