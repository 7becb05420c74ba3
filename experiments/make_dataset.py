r"""Writes a dataset in the project's on-disk format, plus its TFDS array_record build.

  python -m experiments.make_dataset --kind=person --out=data/person --seed=0 \
      --size=128 --frames=250
  python -m experiments.make_dataset --kind=corpus --out=data/corpus --seed=0 \
      --utterances=200 --speakers=20

`--kind=person` renders the synthetic target person's video dataset, `--kind=corpus` the
synthetic multi-speaker audio->motion corpus (docs/dataset_format.md). A summary is
printed and written to OUT/summary.json (and, with --workdir, WORKDIR/metrics.json).
"""

import json
import sys
import time

from absl import app
from absl import flags

from geneface_jax.errors import GenefaceError

FLAGS = flags.FLAGS
flags.DEFINE_enum("kind", "person", ["person", "corpus"], "Which dataset to write.")
flags.DEFINE_string("out", None, "Output dataset directory (must not exist or be empty).")
flags.DEFINE_integer("seed", 0, "Random seed; the same seed gives byte-identical output.")
flags.DEFINE_integer("size", 128, "person: image size in pixels (square).")
flags.DEFINE_integer("frames", 250, "person: number of 25-fps frames.")
flags.DEFINE_integer("utterances", 200, "corpus: number of utterances.")
flags.DEFINE_integer("speakers", 20, "corpus: number of speakers.")
flags.DEFINE_integer("held_out_speakers", 3, "corpus: speakers kept for the test split.")
flags.DEFINE_string("speech_dir", None, "Directory of speech clips (default: shared/data/speech).")
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
    from geneface_jax.data import tfds_builders
    from geneface_jax.data.synthetic import world
    from geneface_jax.train import metrics as metrics_lib

    if not FLAGS.out:
        raise app.UsageError("--out is required")
    t0 = time.time()
    if FLAGS.kind == "person":
        arrays, meta, wav = world.make_person(
            FLAGS.seed, size=FLAGS.size, num_frames=FLAGS.frames,
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
    summary = summarize(FLAGS.kind, arrays, meta, gen_s)
    if FLAGS.tfds:
        t1 = time.time()
        tfds_builders.build(FLAGS.kind, FLAGS.out, progress=FLAGS.progress)
        summary["tfds_seconds"] = round(time.time() - t1, 2)
    summary["total_seconds"] = round(time.time() - t0, 2)
    metrics_lib.write_json_atomic(f"{FLAGS.out}/summary.json", summary)
    if FLAGS.workdir:
        metrics_lib.write_final_metrics(FLAGS.workdir, summary)
    print(json.dumps(summary))


def run():
    try:
        app.run(main)
    except GenefaceError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
