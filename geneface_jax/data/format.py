"""On-disk dataset formats: a person video dataset and an audio->motion corpus.

Both are plain directories of `.npy` arrays (memory-mapped on load), one `audio.wav`
(person) and a `meta.json`; `docs/dataset_format.md` is the full specification. Real-video
preprocessing and the synthetic world write exactly the same format, and the TFDS builders
(`geneface_jax.data.tfds_builders`) read it.

Writes are atomic: everything goes to a temporary sibling directory that is renamed into
place at the end, so an interrupted write never leaves a half-written dataset.
"""

import dataclasses
import json
import pathlib

import numpy as np

from geneface_jax import files
from geneface_jax.audio import features as feat
from geneface_jax.audio import io as audio_io
from geneface_jax.errors import DatasetError

PERSON_FORMAT = "geneface-person"
CORPUS_FORMAT = "geneface-corpus"
VERSION = 1
SPLITS = ("train", "valid", "test")

# name -> (dtype, shape template). Symbols: N frames, H, W image size, A = 2N feature frames,
# C feature channels, F total corpus frames, S total samples, U utterances.
PERSON_ARRAYS = {
    "frames": ("uint8", ("N", "H", "W", 3)),
    "masks": ("uint8", ("N", "H", "W")),
    "background": ("uint8", ("H", "W", 3)),
    "landmarks": ("float32", ("N", 68, 3)),
    "landmarks_2d": ("float32", ("N", 68, 2)),
    "poses": ("float32", ("N", 4, 4)),
    "face_rect": ("int32", ("N", 4)),
    "blink": ("float32", ("N",)),
    "mel": ("float32", ("A", "C")),
    "energy": ("float32", ("A",)),
    "landmark_mean": ("float32", (68, 3)),
    "landmark_std": ("float32", (68, 3)),
}
CORPUS_ARRAYS = {
    "utterances": ("int64", ("U", 4)),   # speaker id, frame start, num frames, split id
    "mel": ("float32", ("A", "C")),
    "energy": ("float32", ("A",)),
    "landmarks": ("float32", ("F", 68, 3)),
    "audio": ("int16", ("S",)),
    "landmark_mean": ("float32", (68, 3)),
    "landmark_std": ("float32", (68, 3)),
}
# Ground truth that only the synthetic world can provide (optional in both formats).
PERSON_ORACLE = {"oracle_open": ("float32", ("N",)), "oracle_width": ("float32", ("N",)),
                 "oracle_smile": ("float32", ("N",))}
CORPUS_ORACLE = {"oracle_open": ("float32", ("F",)), "oracle_width": ("float32", ("F",)),
                 "oracle_smile": ("float32", ("F",)), "oracle_blink": ("float32", ("F",)),
                 "style_mode": ("int64", ("U",))}

# Mask labels.
BACKGROUND, HEAD, TORSO = 0, 1, 2


def landmark_stats(landmarks, min_std=1e-4):
    """Per-coordinate mean and std `[68, 3]` of landmarks `[F, 68, 3]` (std floored)."""
    lms = np.asarray(landmarks, np.float64)
    return (lms.mean(0).astype(np.float32),
            np.maximum(lms.std(0), min_std).astype(np.float32))


def _check_array(path, name, arr, dtype, template, sizes):
    if str(arr.dtype) != dtype:
        raise DatasetError(f"{path}: array '{name}' has dtype {arr.dtype}, expected {dtype}")
    if arr.ndim != len(template):
        raise DatasetError(f"{path}: array '{name}' has shape {arr.shape}, expected rank "
                           f"{len(template)} {template}")
    for dim, want in zip(arr.shape, template):
        if isinstance(want, str):
            if sizes.setdefault(want, dim) != dim:
                raise DatasetError(
                    f"{path}: array '{name}' has shape {arr.shape}: dimension {want}={dim} "
                    f"disagrees with {sizes[want]} found in another array")
        elif dim != want:
            raise DatasetError(f"{path}: array '{name}' has shape {arr.shape}, expected "
                               f"{template}")


def check_output_dir(out_dir, overwrite=False):
    """Raises DatasetError when `out_dir` exists, is not empty and `overwrite` is off."""
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise DatasetError(f"{out_dir}: output directory exists and is not empty "
                           "(pass overwrite=True / --overwrite to replace it)")


def _write_dir(out_dir, arrays, meta, wav=None, overwrite=False):
    out_dir = pathlib.Path(out_dir)
    check_output_dir(out_dir, overwrite)
    with files.atomic_dir(out_dir) as tmp:
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr), allow_pickle=False)
        if wav is not None:
            audio_io.save_wav(tmp / "audio.wav", wav, feat.SAMPLE_RATE)
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
            f.write("\n")
    return out_dir


def _load_meta(path, kind):
    path = pathlib.Path(path)
    if not path.is_dir():
        raise DatasetError(f"{path}: dataset directory does not exist")
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise DatasetError(f"{path}: not a dataset (no meta.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:
        raise DatasetError(f"{meta_path}: not valid JSON ({e})") from e
    if meta.get("format") != kind:
        raise DatasetError(f"{path}: dataset format is {meta.get('format')!r}, "
                           f"expected {kind!r}")
    if meta.get("version") != VERSION:
        raise DatasetError(f"{path}: format version {meta.get('version')} is not supported "
                           f"(this code reads version {VERSION})")
    return meta


def _load_arrays(path, specs, optional, sizes):
    out = {}
    for name, (dtype, template) in {**specs, **optional}.items():
        f = path / f"{name}.npy"
        if not f.is_file():
            if name in specs:
                raise DatasetError(f"{path}: missing array file {f.name}")
            continue
        try:
            arr = np.load(f, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise DatasetError(f"{f}: unreadable array ({e})") from e
        _check_array(path, name, arr, dtype, template, sizes)
        out[name] = arr
    return out


@dataclasses.dataclass
class PersonDataset:
    """A loaded person video dataset; arrays are read-only memory maps.

    Attributes:
      path: the dataset directory.
      meta: the parsed meta.json (intrinsics, splits, near/far, ...).
      arrays: name -> array, see PERSON_ARRAYS (plus PERSON_ORACLE if synthetic).
    """
    path: pathlib.Path
    meta: dict
    arrays: dict

    def __getitem__(self, name):
        return self.arrays[name]

    @property
    def num_frames(self):
        return int(self.meta["num_frames"])

    @property
    def intrinsics(self):
        """(fx, fy, cx, cy) in pixels."""
        return np.asarray(self.meta["intrinsics"], np.float32)

    def split(self, name):
        """Frame indices `[n]` of split 'train' or 'valid'."""
        if name not in self.meta["splits"]:
            raise DatasetError(f"{self.path}: no split {name!r} "
                               f"(has {sorted(self.meta['splits'])})")
        lo, hi = self.meta["splits"][name]
        return np.arange(lo, hi)

    def audio(self):
        """The 16 kHz mono audio track, float32 `[N * 640]`."""
        return audio_io.load_audio(self.path / "audio.wav")


def write_person(out_dir, arrays, meta, wav, *, overwrite=False):
    """Writes a person dataset (see docs/dataset_format.md); returns the directory.

    `arrays` must hold every PERSON_ARRAYS entry (oracle entries optional); `meta` must hold
    `intrinsics` [4], `splits` {name: [start, stop)}, `near`, `far`; `wav` is float32
    `[N * 640]` at 16 kHz.
    """
    sizes = {}
    for name, (dtype, template) in {**PERSON_ARRAYS, **PERSON_ORACLE}.items():
        if name in arrays:
            _check_array(out_dir, name, np.asarray(arrays[name]), dtype, template, sizes)
        elif name in PERSON_ARRAYS:
            raise DatasetError(f"{out_dir}: cannot write person dataset: missing '{name}'")
    n = sizes["N"]
    if sizes["A"] != 2 * n or len(wav) != n * feat.SAMPLES_PER_VIDEO_FRAME:
        raise DatasetError(f"{out_dir}: {n} frames need {2 * n} feature frames and "
                           f"{n * feat.SAMPLES_PER_VIDEO_FRAME} samples, got {sizes['A']} "
                           f"and {len(wav)}")
    full_meta = dict(meta, format=PERSON_FORMAT, version=VERSION, num_frames=n,
                     height=sizes["H"], width=sizes["W"], feature_dim=sizes["C"],
                     fps=feat.VIDEO_FPS, feature_rate=feat.FEATURE_RATE,
                     sample_rate=feat.SAMPLE_RATE)
    return _write_dir(out_dir, arrays, full_meta, wav, overwrite)


def load_person(path):
    """Loads and validates a person dataset directory -> PersonDataset."""
    path = pathlib.Path(path)
    meta = _load_meta(path, PERSON_FORMAT)
    sizes = {}
    arrays = _load_arrays(path, PERSON_ARRAYS, PERSON_ORACLE, sizes)
    if sizes["N"] != meta["num_frames"] or sizes["A"] != 2 * sizes["N"]:
        raise DatasetError(f"{path}: arrays hold {sizes['N']} frames and {sizes['A']} "
                           f"feature frames; meta.json says {meta['num_frames']} frames")
    if not (path / "audio.wav").is_file():
        raise DatasetError(f"{path}: missing audio.wav")
    return PersonDataset(path, meta, arrays)


@dataclasses.dataclass
class Corpus:
    """A loaded audio->motion corpus; arrays are read-only memory maps."""
    path: pathlib.Path
    meta: dict
    arrays: dict

    def __len__(self):
        return len(self.arrays["utterances"])

    def __getitem__(self, name):
        return self.arrays[name]

    def split(self, name):
        """Utterance indices `[n]` of split 'train', 'valid' or 'test'."""
        if name not in SPLITS:
            raise DatasetError(f"{self.path}: unknown split {name!r}, one of {SPLITS}")
        return np.nonzero(self.arrays["utterances"][:, 3] == SPLITS.index(name))[0]

    def utterance(self, i):
        """One utterance as a dict of arrays (`mel` [2T, C], `energy` [2T], `landmarks`
        [T, 68, 3], `audio` float32 [T * 640], oracle arrays if present) plus `speaker`,
        `split` and `index`."""
        spk, start, num, split = (int(v) for v in self.arrays["utterances"][i])
        out = dict(index=i, speaker=spk, split=SPLITS[split],
                   mel=np.asarray(self.arrays["mel"][2 * start:2 * (start + num)]),
                   energy=np.asarray(self.arrays["energy"][2 * start:2 * (start + num)]),
                   landmarks=np.asarray(self.arrays["landmarks"][start:start + num]))
        spf = feat.SAMPLES_PER_VIDEO_FRAME
        out["audio"] = (np.asarray(self.arrays["audio"][start * spf:(start + num) * spf],
                                   np.float32) / 32768.0)
        for name in ("oracle_open", "oracle_width", "oracle_smile", "oracle_blink"):
            if name in self.arrays:
                out[name] = np.asarray(self.arrays[name][start:start + num])
        if "style_mode" in self.arrays:
            out["style_mode"] = int(self.arrays["style_mode"][i])
        return out


def write_corpus(out_dir, arrays, meta, *, overwrite=False):
    """Writes a corpus (see docs/dataset_format.md); returns the directory."""
    sizes = {}
    for name, (dtype, template) in {**CORPUS_ARRAYS, **CORPUS_ORACLE}.items():
        if name in arrays:
            _check_array(out_dir, name, np.asarray(arrays[name]), dtype, template, sizes)
        elif name in CORPUS_ARRAYS:
            raise DatasetError(f"{out_dir}: cannot write corpus: missing '{name}'")
    _check_corpus_index(out_dir, arrays["utterances"], sizes)
    utt = np.asarray(arrays["utterances"])
    full_meta = dict(meta, format=CORPUS_FORMAT, version=VERSION, num_utterances=len(utt),
                     num_frames=sizes["F"], num_speakers=int(utt[:, 0].max()) + 1,
                     feature_dim=sizes["C"], fps=feat.VIDEO_FPS,
                     feature_rate=feat.FEATURE_RATE, sample_rate=feat.SAMPLE_RATE,
                     split_sizes={s: int((utt[:, 3] == k).sum()) for k, s in enumerate(SPLITS)})
    return _write_dir(out_dir, arrays, full_meta, None, overwrite)


def _check_corpus_index(path, utt, sizes):
    utt = np.asarray(utt)
    f = sizes["F"]
    ends = utt[:, 1] + utt[:, 2]
    if (sizes["A"] != 2 * f or sizes["S"] != f * feat.SAMPLES_PER_VIDEO_FRAME
            or np.any(utt[:, 2] <= 0) or np.any(utt[:, 1] < 0) or np.any(ends > f)
            or np.any(utt[1:, 1] != ends[:-1]) or np.any((utt[:, 3] < 0) | (utt[:, 3] > 2))):
        raise DatasetError(f"{path}: inconsistent corpus index: utterances must tile the "
                           f"{f} frames contiguously, with 2 feature frames and "
                           f"{feat.SAMPLES_PER_VIDEO_FRAME} samples per frame")


def load_corpus(path):
    """Loads and validates a corpus directory -> Corpus."""
    path = pathlib.Path(path)
    meta = _load_meta(path, CORPUS_FORMAT)
    sizes = {}
    arrays = _load_arrays(path, CORPUS_ARRAYS, CORPUS_ORACLE, sizes)
    _check_corpus_index(path, arrays["utterances"], sizes)
    return Corpus(path, meta, arrays)
