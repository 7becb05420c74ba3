"""LRS3 -> an audio-to-motion corpus: per-clip landmarks and audio features, in parallel.

LRS3 (Afouras et al. 2018) is distributed by its authors after registration; put it in a
directory (the TFDS *manual dir*) with its own layout:

  ROOT/pretrain/<speaker>/<clip>.mp4
  ROOT/trainval/<speaker>/<clip>.mp4
  ROOT/test/<speaker>/<clip>.mp4

(the `.txt` transcripts next to the clips are ignored). Each clip goes through the same
landmark pipeline as a person video (`preprocess.track_clip`: face mesh -> 68 points ->
pose-free head-space landmarks; no masks or background) and the same audio features.

`process_clips` runs the clips in worker processes with a progress bar. Every finished clip
is cached at once (`WORK/clips/<split>/<speaker>/<clip>.npz`, written atomically), so an
interrupted run resumes where it stopped; a clip that fails (no face, no audio, too short,
unreadable) is logged in `WORK/failed.jsonl` with its error and skipped, also on reruns.

Splits: `pretrain` and `trainval` clips train, except every `valid_every`-th clip of each
training speaker, which goes to 'valid'; `test` (speakers disjoint from training in LRS3)
is the held-out-speaker 'test' split, as in the corpus format.

Outputs:
- `Lrs3` is a TFDS builder (array_record, read with `as_data_source()`, no TensorFlow):
  one example per clip with `index`, `speaker`, `clip` (its `split/speaker/clip` name),
  `mel [2T, C]`, `energy [2T]`, `landmarks [T, 68, 3]`, `audio [640 T]` int16.
- `export_corpus` writes the corpus directory format (docs/dataset_format.md) that
  `experiments/train_audio2motion.py --corpus=DIR` trains on.
"""

import concurrent.futures as futures
import json
import multiprocessing
import os
import pathlib
import shutil
import tempfile

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from geneface_jax import files
from geneface_jax.audio import features as feat
from geneface_jax.data import format as fmt
from geneface_jax.errors import DatasetError, GenefaceError

LRS3_SPLITS = ("pretrain", "trainval", "test")
_VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm")


def scan(root):
    """All clips under an LRS3 root -> list of `(split, speaker, clip_path)`, sorted."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: LRS3 directory not found")
    clips = []
    for split in LRS3_SPLITS:
        base = root / split
        if not base.is_dir():
            continue
        for speaker in sorted(p for p in base.iterdir() if p.is_dir()):
            for clip in sorted(speaker.iterdir()):
                if clip.suffix.lower() in _VIDEO_SUFFIXES and clip.is_file():
                    clips.append((split, speaker.name, clip))
    if not clips:
        raise DatasetError(f"{root}: no clips found (expected {'/'.join(LRS3_SPLITS)}/"
                           "<speaker>/<clip>.mp4)")
    return clips


def _cache_path(work, split, speaker, clip):
    return pathlib.Path(work) / "clips" / split / speaker / (pathlib.Path(clip).stem + ".npz")


_WORKER = {}


def _init_worker(models_dir, hubert_checkpoint, min_frames):
    from geneface_jax.data import preprocess
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    _WORKER.update(cfg=preprocess.PreprocessConfig(min_frames=min_frames),
                   models_dir=models_dir, hubert=hubert_checkpoint)


def _process_one(job):
    """Runs in a worker: one clip -> its cache file; returns (key, error or None)."""
    from geneface_jax.data import preprocess
    split, speaker, clip, out = job
    key = f"{split}/{speaker}/{pathlib.Path(clip).stem}"
    try:
        r = preprocess.track_clip(clip, _WORKER["cfg"], _WORKER["models_dir"],
                                  hubert_checkpoint=_WORKER["hubert"])
    except GenefaceError as e:
        return key, str(e)
    except Exception as e:  # noqa: BLE001 - a broken clip must not stop the corpus
        return key, f"{type(e).__name__}: {e}"
    audio = np.clip(np.round(r["wav"] * 32767), -32768, 32767).astype(np.int16)
    with files.atomic_path(out, ".npz") as tmp:
        np.savez(tmp, landmarks=r["landmarks"].astype(np.float32),
                 mel=r["mel"].astype(np.float32), energy=r["energy"].astype(np.float32),
                 audio=audio, feature=np.asarray(r["feature"]))
    return key, None


def process_clips(root, work_dir, *, workers=None, models_dir=None, hubert_checkpoint=None,
                  min_frames=25, progress=True):
    """Tracks every clip not done yet (see module doc).

    Returns:
      (done, failed): `done` a list of `(split, speaker, cache_path)` in scan order,
      `failed` a dict `{split/speaker/clip: error}` (this run's and earlier runs').
    """
    work = pathlib.Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "failed.jsonl"
    failed = {}
    if log.exists():
        for line in log.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                failed[rec["clip"]] = rec["error"]
    clips = scan(root)
    jobs = []
    for split, speaker, clip in clips:
        key = f"{split}/{speaker}/{clip.stem}"
        out = _cache_path(work, split, speaker, clip)
        if not out.exists() and key not in failed:
            jobs.append((split, speaker, str(clip), str(out)))
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    if jobs:
        ctx = multiprocessing.get_context("spawn")
        with futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                         initargs=(models_dir, hubert_checkpoint,
                                                   min_frames)) as pool, \
                open(log, "a") as log_f:
            pending = [pool.submit(_process_one, j) for j in jobs]
            bar = tqdm.tqdm(total=len(jobs), desc="LRS3 clips", unit="clip",
                            disable=not progress)
            for fut in futures.as_completed(pending):
                key, err = fut.result()
                if err is not None:
                    failed[key] = err
                    log_f.write(json.dumps(dict(clip=key, error=err)) + "\n")
                    log_f.flush()
                    bar.write(f"skipped {key}: {err}")
                bar.update(1)
            bar.close()
    done = [(s, spk, _cache_path(work, s, spk, c)) for s, spk, c in clips
            if _cache_path(work, s, spk, c).exists()]
    return done, failed


def assign_splits(done, valid_every=20):
    """`(split, speaker, path)` -> list of `(corpus_split_id, speaker_id, path)`.

    Split ids: 0 train, 1 valid (every `valid_every`-th clip of a training speaker, at
    least one when there are two or more training clips), 2 test. Speaker ids number the
    sorted speaker names (training speakers first, then test)."""
    train_spk = sorted({spk for s, spk, _ in done if s != "test"})
    test_spk = sorted({spk for s, spk, _ in done if s == "test"} - set(train_spk))
    ids = {spk: i for i, spk in enumerate(train_spk + test_spk)}
    out, seen = [], {}
    for split, spk, path in done:
        if split == "test":
            sid = 2
        else:
            k = seen.get(spk, 0)
            seen[spk] = k + 1
            sid = 1 if valid_every and k % valid_every == valid_every - 1 else 0
        out.append((sid, ids[spk], path))
    # a small tree still gets a validation utterance: the last training clip
    train = [i for i, (sid, _, _) in enumerate(out) if sid == 0]
    if valid_every and len(train) >= 2 and not any(sid == 1 for sid, _, _ in out):
        out[train[-1]] = (1,) + out[train[-1]][1:]
    return out


def export_corpus(done, out_dir, *, valid_every=20, overwrite=False):
    """Writes the cached clips as a corpus directory (docs/dataset_format.md).

    The arrays are assembled in memory-mapped scratch files next to `out_dir` (removed
    afterwards), so memory stays flat however many clips there are; the landmark
    statistics are accumulated over the train split in one pass.
    """
    items = assign_splits(done, valid_every)
    if not items:
        raise DatasetError(f"{out_dir}: no processed clips to export")
    lengths, feature, dim = [], None, None
    for _, _, path in items:
        with np.load(path) as z:
            lengths.append(len(z["landmarks"]))
            feature, dim = str(z["feature"]), z["mel"].shape[1]
    total = int(sum(lengths))
    out_dir = pathlib.Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-",
                                            dir=out_dir.parent))
    try:
        mm = lambda name, dtype, shape: np.lib.format.open_memmap(  # noqa: E731
            scratch / f"{name}.npy", "w+", dtype, shape)
        arrays = dict(landmarks=mm("landmarks", np.float32, (total, 68, 3)),
                      mel=mm("mel", np.float32, (2 * total, dim)),
                      energy=mm("energy", np.float32, (2 * total,)),
                      audio=mm("audio", np.int16, (total * feat.SAMPLES_PER_VIDEO_FRAME,)))
        utt = []
        start = 0
        s1 = np.zeros((68, 3))
        s2 = np.zeros((68, 3))
        count = 0
        spf = feat.SAMPLES_PER_VIDEO_FRAME
        for (split_id, spk, path), n in zip(items, lengths):
            with np.load(path) as z:
                arrays["landmarks"][start:start + n] = z["landmarks"]
                arrays["mel"][2 * start:2 * (start + n)] = z["mel"]
                arrays["energy"][2 * start:2 * (start + n)] = z["energy"]
                arrays["audio"][spf * start:spf * (start + n)] = z["audio"]
                if split_id == 0:
                    lms = z["landmarks"].astype(np.float64)
                    s1 += lms.sum(0)
                    s2 += (lms * lms).sum(0)
                    count += n
            utt.append((spk, start, n, split_id))
            start += n
        if count == 0:            # no training clip: statistics over everything
            lms = np.asarray(arrays["landmarks"], np.float64)
            s1, s2, count = lms.sum(0), (lms * lms).sum(0), len(lms)
        mean = s1 / count
        std = np.sqrt(np.maximum(s2 / count - mean * mean, 0.0))
        arrays.update(utterances=np.asarray(utt, np.int64),
                      landmark_mean=mean.astype(np.float32),
                      landmark_std=np.maximum(std, 1e-4).astype(np.float32))
        meta = dict(source="lrs3", seed=0, feature=feature,
                    held_out_speakers=sorted({int(s) for s, _, _, sp in utt if sp == 2}))
        return fmt.write_corpus(out_dir, arrays, meta, overwrite=overwrite)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class Lrs3(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder of LRS3 (manual download; see the module doc for the layout).

    `Lrs3(data_dir=..., work_dir=...).download_and_prepare(download_config=
    tfds.download.DownloadConfig(manual_dir=ROOT))`; clips are processed (or taken from the
    cache in `work_dir`, default `<data_dir>/../lrs3_work`) when the splits are generated.
    `feature_dim` is 80 for log-mel, 1024 with a HuBERT-large checkpoint.
    """

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place LRS3 (pretrain/, trainval/, test/ of <speaker>/<clip>.mp4) in manual_dir.")

    def __init__(self, *, feature_dim=80, work_dir=None, workers=None, models_dir=None,
                 hubert_checkpoint=None, valid_every=20, progress=True, **kwargs):
        self._feature_dim = int(feature_dim)
        self._opts = dict(workers=workers, models_dir=models_dir,
                          hubert_checkpoint=hubert_checkpoint, progress=progress)
        self._valid_every = valid_every
        self._work_dir = work_dir
        self.failed = {}
        super().__init__(file_format="array_record", **kwargs)

    def _info(self):
        c = self._feature_dim
        feats = dict(index=np.int32, speaker=np.int32, clip=tfds.features.Text(),
                     mel=tfds.features.Tensor(shape=(None, c), dtype=np.float32),
                     energy=tfds.features.Tensor(shape=(None,), dtype=np.float32),
                     landmarks=tfds.features.Tensor(shape=(None, 68, 3), dtype=np.float32),
                     audio=tfds.features.Tensor(shape=(None,), dtype=np.int16))
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(feats),
                                     disable_shuffling=True,
                                     description="LRS3 landmarks and audio features")

    def _split_generators(self, dl_manager):
        work = self._work_dir or pathlib.Path(self.data_dir).parent / "lrs3_work"
        done, self.failed = process_clips(dl_manager.manual_dir, work, **self._opts)
        items = assign_splits(done, self._valid_every)
        names = {0: "train", 1: "valid", 2: "test"}
        return {names[s]: self._generate_examples(
                    [(i, spk, p) for i, (sid, spk, p) in enumerate(items) if sid == s])
                for s in sorted({sid for sid, _, _ in items})}

    def _generate_examples(self, items):
        for i, spk, path in items:
            with np.load(path) as z:
                if z["mel"].shape[1] != self._feature_dim:
                    raise DatasetError(f"{path}: feature dim {z['mel'].shape[1]} != "
                                       f"{self._feature_dim}")
                parts = pathlib.Path(path).parts
                yield i, dict(index=i, speaker=spk, clip="/".join(parts[-3:])[:-4],
                              mel=z["mel"], energy=z["energy"], landmarks=z["landmarks"],
                              audio=z["audio"])


def build(root, out_dir, *, work_dir=None, workers=None, models_dir=None,
          hubert_checkpoint=None, valid_every=20, tfds_build=True, overwrite=False,
          progress=True):
    """LRS3 root -> corpus directory `out_dir` (+ its TFDS build in `out_dir/tfds`).

    Returns a summary dict: clips done/failed, frames, hours, split sizes."""
    out_dir = pathlib.Path(out_dir)
    fmt.check_output_dir(out_dir, overwrite)           # before the work, not after it
    work = pathlib.Path(work_dir or f"{out_dir}_work")
    done, failed = process_clips(root, work, workers=workers, models_dir=models_dir,
                                 hubert_checkpoint=hubert_checkpoint, progress=progress)
    export_corpus(done, out_dir, valid_every=valid_every, overwrite=overwrite)
    corpus = fmt.load_corpus(out_dir)
    if tfds_build:
        if not progress:
            tfds.disable_progress_bar()
        builder = Lrs3(data_dir=str(out_dir / "tfds"), work_dir=work,
                       feature_dim=corpus.meta["feature_dim"], workers=workers,
                       models_dir=models_dir, hubert_checkpoint=hubert_checkpoint,
                       valid_every=valid_every, progress=progress)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
    return dict(clips=len(done), failed=len(failed), failed_clips=failed,
                frames=int(corpus.meta["num_frames"]),
                hours=round(corpus.meta["num_frames"] / 25.0 / 3600.0, 4),
                split_sizes=corpus.meta["split_sizes"], work_dir=str(work))
