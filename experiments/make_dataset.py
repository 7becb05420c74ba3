r"""Writes a dataset in the project's on-disk format, plus its TFDS array_record build.

  python -m experiments.make_dataset --kind=person --out=data/person --seed=0 \
      --size=128 --frames=250
  python -m experiments.make_dataset --kind=corpus --out=data/corpus --seed=0 \
      --utterances=200 --speakers=20

  python -m experiments.make_dataset --kind=video --video=me.mp4 --out=data/me
  python -m experiments.make_dataset --kind=lrs3 --lrs3_dir=/data/LRS3 --out=data/lrs3

`--kind=person` renders the synthetic target person's video dataset, `--kind=corpus` the
synthetic multi-speaker audio->motion corpus, `--kind=video` preprocesses a real 3-5 minute
video of one person talking into a person dataset (`geneface_jax.data.preprocess`),
`--kind=lrs3` the LRS3 corpus into an audio->motion corpus (`geneface_jax.data.lrs3`;
resumable, bad clips skipped and listed). Real data needs the face models, fetched once:
`python -m geneface_jax.data.face_models --fetch`. All write the formats of
docs/dataset_format.md. A summary is
printed and written to OUT/summary.json (and, with --workdir, WORKDIR/metrics.json).
"""

import json
import sys
import time

from absl import app
from absl import flags

from geneface_jax.errors import GenefaceError

FLAGS = flags.FLAGS
flags.DEFINE_enum("kind", "person", ["person", "corpus", "video", "lrs3"],
                  "Which dataset to write.")
flags.DEFINE_string("lrs3_dir", None, "lrs3: the LRS3 root (pretrain/, trainval/, test/).")
flags.DEFINE_integer("workers", None, "lrs3: worker processes (default: all cores).")
flags.DEFINE_string("work_dir", None, "lrs3: per-clip cache for resuming (default OUT_work).")
flags.DEFINE_string("out", None, "Output dataset directory (must not exist or be empty).")
flags.DEFINE_integer("seed", 0, "Random seed; the same seed gives byte-identical output.")
flags.DEFINE_integer("size", None, "person/video: image size in pixels (square); default 128 "
                     "for the synthetic person, 512 for a video.")
flags.DEFINE_string("video", None, "video: the input video file (any format FFmpeg reads).")
flags.DEFINE_integer("max_gap", 5, "video: longest run of face-less frames to interpolate.")
flags.DEFINE_integer("min_frames", 50, "video: fewer 25-fps frames than this is an error.")
flags.DEFINE_float("focal", None, "video: focal length / frame size; default: estimated "
                   "from the head's motion, else GeneFace's 1200 px at 512 px (2.34).")
flags.DEFINE_float("crop_scale", 3.0, "video: crop side / brow-to-chin height.")
flags.DEFINE_string("hubert_checkpoint", None, "video: HuBERT checkpoint directory for "
                    "1024-d features instead of log-mel.")
flags.DEFINE_string("face_models", None, "video: directory of the face models (default "
                    "$GENEFACE_FACE_MODELS or ~/.cache/geneface_jax/face_models).")
flags.DEFINE_integer("frames", 250, "person: number of 25-fps frames.")
flags.DEFINE_integer("utterances", 200, "corpus: number of utterances.")
flags.DEFINE_integer("speakers", 20, "corpus: number of speakers.")
flags.DEFINE_integer("held_out_speakers", 3, "corpus: speakers kept for the test split.")
flags.DEFINE_string("speech_dir", None, "Directory of speech clips (default: the packaged "
                    "clips, or $GENEFACE_SPEECH_DIR).")
flags.DEFINE_bool("tfds", True, "Also build the TFDS array_record dataset under OUT/tfds.")
flags.DEFINE_bool("overwrite", False, "Replace an existing output directory.")
flags.DEFINE_bool("progress", True, "Show progress bars.")
flags.DEFINE_string("workdir", None, "Optional: also write the summary to WORKDIR/metrics.json.")


def summarize(kind, arrays, meta, seconds):
    """Small JSON-able summary of a generated dataset."""
    import numpy as np
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


def main(argv):
    del argv
    from geneface_jax.data import format as fmt
    from geneface_jax.data.synthetic import world

    if not FLAGS.out:
        raise app.UsageError("--out is required")
    t0 = time.time()
    if FLAGS.kind == "video":
        return _video()
    if FLAGS.kind == "lrs3":
        return _lrs3()
    if FLAGS.kind == "person":
        arrays, meta, wav = world.make_person(
            FLAGS.seed, size=FLAGS.size or 128, num_frames=FLAGS.frames,
            speech_dir=FLAGS.speech_dir, progress=FLAGS.progress)
        gen_s = time.time() - t0
        fmt.write_person(FLAGS.out, arrays, meta, wav, overwrite=FLAGS.overwrite)
    else:
        arrays, meta = world.make_corpus(
            FLAGS.seed, num_utterances=FLAGS.utterances, num_speakers=FLAGS.speakers,
            held_out_speakers=FLAGS.held_out_speakers, speech_dir=FLAGS.speech_dir,
            progress=FLAGS.progress)
        gen_s = time.time() - t0
        fmt.write_corpus(FLAGS.out, arrays, meta, overwrite=FLAGS.overwrite)
    _finish(summarize(FLAGS.kind, arrays, meta, gen_s), FLAGS.kind, t0)


def _finish(summary, tfds_kind, t0):
    """Builds the TFDS dataset (when `tfds_kind` and --tfds), writes OUT/summary.json (and
    WORKDIR/metrics.json) and prints the summary."""
    from geneface_jax.data import tfds_builders
    from geneface_jax.train import metrics as metrics_lib
    if FLAGS.tfds and tfds_kind:
        t1 = time.time()
        tfds_builders.build(tfds_kind, FLAGS.out, progress=FLAGS.progress)
        summary["tfds_seconds"] = round(time.time() - t1, 2)
    summary["total_seconds"] = round(time.time() - t0, 2)
    metrics_lib.write_json_atomic(f"{FLAGS.out}/summary.json", summary)
    if FLAGS.workdir:
        metrics_lib.write_final_metrics(FLAGS.workdir, summary)
    print(json.dumps(summary))


def _video():
    from geneface_jax.data import preprocess

    if not FLAGS.video:
        raise app.UsageError("--kind=video needs --video=FILE")
    cfg = preprocess.PreprocessConfig(
        size=FLAGS.size or 512, max_gap=FLAGS.max_gap, min_frames=FLAGS.min_frames,
        crop_scale=FLAGS.crop_scale,
        focal=FLAGS.focal)
    t0 = time.time()
    summary = preprocess.preprocess_video(
        FLAGS.video, FLAGS.out, cfg, models_dir=FLAGS.face_models,
        hubert_checkpoint=FLAGS.hubert_checkpoint, overwrite=FLAGS.overwrite,
        progress=FLAGS.progress)
    if summary["interpolated"]:
        print(f"note: no face in {len(summary['interpolated'])} short gap(s), interpolated: "
              + ", ".join(f"frames {a}-{b}" for a, b in summary["interpolated"]),
              file=sys.stderr)
    _finish(summary, "person", t0)


def _lrs3():
    from geneface_jax.data import lrs3

    if not FLAGS.lrs3_dir:
        raise app.UsageError("--kind=lrs3 needs --lrs3_dir=ROOT")
    t0 = time.time()
    summary = lrs3.build(FLAGS.lrs3_dir, FLAGS.out, work_dir=FLAGS.work_dir,
                         workers=FLAGS.workers, models_dir=FLAGS.face_models,
                         hubert_checkpoint=FLAGS.hubert_checkpoint, tfds_build=FLAGS.tfds,
                         overwrite=FLAGS.overwrite, progress=FLAGS.progress)
    _finish(summary, None, t0)          # the Lrs3 TFDS build is made by lrs3.build


def run():
    try:
        app.run(main)
    except GenefaceError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
