"""Making a dataset in the project's on-disk format (docs/dataset_format.md), whichever
its source: `make_dataset`, what `experiments.make_dataset` runs.

  person  the synthetic target person's video dataset (`synthetic.world.make_person`)
  corpus  the synthetic multi-speaker audio->motion corpus (`synthetic.world.make_corpus`)
  video   a real 3-5 minute video of one person talking -> a person dataset
          (`preprocess.preprocess_video`; needs the face models)
  lrs3    the LRS3 corpus -> an audio->motion corpus (`lrs3.build`; resumable, bad clips
          skipped and listed; needs the face models)
"""

import json
import pathlib
import sys
import time

import numpy as np

from geneface_jax import files
from geneface_jax.errors import InputError

KINDS = ("person", "corpus", "video", "lrs3")


def make_dataset(kind, out, *, seed=0, size=None, frames=250, utterances=200, speakers=20,
                 held_out_speakers=3, speech_dir=None, video=None, max_gap=5, min_frames=50,
                 focal=None, crop_scale=3.0, lrs3_dir=None, workers=None, work_dir=None,
                 hubert_checkpoint=None, face_models=None, tfds=True, overwrite=False,
                 progress=True, workdir=None):
    """Writes the `kind` dataset (one of KINDS) to `out` and its TFDS array_record build
    to `out/tfds` (with `tfds`), and a summary to `out/summary.json` (and, with `workdir`,
    `workdir/metrics.json`).

    Args:
      kind, out: which dataset, and its directory (must not exist or be empty, unless
        `overwrite`).
      seed: random seed of the synthetic datasets (the same seed, byte-identical output).
      size: person / video image size in pixels (default 128 synthetic, 512 video).
      frames: person: number of 25-fps frames.
      utterances, speakers, held_out_speakers: corpus sizes (held-out speakers: the test
        split).
      speech_dir: person / corpus: directory of speech clips (default: the packaged clips
        or $GENEFACE_SPEECH_DIR).
      video, max_gap, min_frames, focal, crop_scale: video: the input file and
        `preprocess.PreprocessConfig`'s fields.
      lrs3_dir, workers, work_dir: lrs3: the LRS3 root, worker processes (default: all
        cores), per-clip cache for resuming (default OUT_work).
      hubert_checkpoint, face_models: video / lrs3: HuBERT checkpoint directory (1024-d
        features instead of log-mel), face-model directory.
      progress: show progress bars.
    Returns:
      the summary (kind, sizes, mouth-opening range, timings; what each source reports).
    Raises:
      a GenefaceError naming the input and the problem; nothing is left in `out`.
    """
    if kind not in KINDS:
        raise InputError(f"make_dataset: kind must be one of {KINDS}, got {kind!r}")
    t0 = time.time()
    tfds_kind = "person" if kind in ("person", "video") else "corpus"
    if kind in ("person", "corpus"):
        summary = _synthetic(kind, out, seed=seed, size=size, frames=frames,
                             utterances=utterances, speakers=speakers,
                             held_out_speakers=held_out_speakers, speech_dir=speech_dir,
                             overwrite=overwrite, progress=progress)
    elif kind == "video":
        if not video:
            raise InputError("make_dataset: kind='video' needs the input video (--video)")
        from geneface_jax.data import preprocess
        cfg = preprocess.PreprocessConfig(size=size or 512, max_gap=max_gap,
                                          min_frames=min_frames, crop_scale=crop_scale,
                                          focal=focal)
        summary = preprocess.preprocess_video(
            video, out, cfg, models_dir=face_models, hubert_checkpoint=hubert_checkpoint,
            overwrite=overwrite, progress=progress)
        if summary["interpolated"]:
            print(f"note: no face in {len(summary['interpolated'])} short gap(s), "
                  "interpolated: " + ", ".join(f"frames {a}-{b}"
                                              for a, b in summary["interpolated"]),
                  file=sys.stderr)
    else:
        if not lrs3_dir:
            raise InputError("make_dataset: kind='lrs3' needs the LRS3 root (--lrs3_dir)")
        from geneface_jax.data import lrs3
        summary = lrs3.build(lrs3_dir, out, work_dir=work_dir, workers=workers,
                             models_dir=face_models, hubert_checkpoint=hubert_checkpoint,
                             tfds_build=tfds, overwrite=overwrite, progress=progress)
        tfds_kind = None                        # lrs3.build made its own TFDS build
    if tfds and tfds_kind:
        from geneface_jax.data import tfds_builders
        t1 = time.time()
        tfds_builders.build(tfds_kind, out, progress=progress)
        summary["tfds_seconds"] = round(time.time() - t1, 2)
    summary["total_seconds"] = round(time.time() - t0, 2)
    _write_json(pathlib.Path(out) / "summary.json", summary)
    if workdir:
        _write_json(pathlib.Path(workdir) / "metrics.json", summary)
    return summary


def _synthetic(kind, out, *, seed, size, frames, utterances, speakers, held_out_speakers,
               speech_dir, overwrite, progress):
    from geneface_jax.data import format as fmt
    from geneface_jax.data.synthetic import world
    t0 = time.time()
    if kind == "person":
        arrays, meta, wav = world.make_person(seed, size=size or 128, num_frames=frames,
                                              speech_dir=speech_dir, progress=progress)
        seconds = time.time() - t0
        fmt.write_person(out, arrays, meta, wav, overwrite=overwrite)
    else:
        arrays, meta = world.make_corpus(seed, num_utterances=utterances,
                                         num_speakers=speakers,
                                         held_out_speakers=held_out_speakers,
                                         speech_dir=speech_dir, progress=progress)
        seconds = time.time() - t0
        fmt.write_corpus(out, arrays, meta, overwrite=overwrite)
    return summarize(kind, arrays, meta, seconds)


def summarize(kind, arrays, meta, seconds):
    """Small JSON-able summary of a generated synthetic dataset."""
    from geneface_jax.data import landmarks as lm
    out = dict(kind=kind, seed=meta["seed"], generate_seconds=round(seconds, 2))
    lms = arrays["landmarks"]
    opening = lm.mouth_opening(lms)
    out.update(num_frames=int(len(lms)), mouth_opening_mean=float(opening.mean()),
               mouth_opening_max=float(opening.max()))
    if kind == "person":
        n, h, w, _ = arrays["frames"].shape
        out.update(height=h, width=w, seconds=n / 25.0, splits=meta["splits"],
                   head_pixels_mean=float((arrays["masks"] == 1).sum((1, 2)).mean()),
                   torso_pixels_mean=float((arrays["masks"] == 2).sum((1, 2)).mean()),
                   blinks=int(np.sum(np.diff((arrays["blink"] > 0.5).astype(int)) == 1)))
    else:
        utt = arrays["utterances"]
        out.update(num_utterances=int(len(utt)), num_speakers=int(utt[:, 0].max() + 1),
                   hours=float(len(lms) / 25.0 / 3600.0),
                   split_sizes={s: int((utt[:, 3] == i).sum())
                                for i, s in enumerate(("train", "valid", "test"))})
    return out


def _write_json(path, obj):
    """`obj` as indented, key-sorted JSON (NumPy values as plain numbers), written
    atomically."""
    def plain(value):
        value = np.asarray(value)
        return value.tolist() if value.ndim else value.item()
    text = json.dumps(obj, indent=1, sort_keys=True, default=plain) + "\n"
    files.write_bytes_atomic(path, text.encode())
