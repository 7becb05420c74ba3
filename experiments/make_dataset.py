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
docs/dataset_format.md (`geneface_jax.data.make.make_dataset`). A summary is printed and
written to OUT/summary.json (and, with --workdir, WORKDIR/metrics.json). Bad input prints
one `error:` line and exits with status 2; nothing is left in OUT.
"""

import json

from absl import flags

from experiments import common

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


# Every flag but --kind and --out is a keyword argument of make_dataset of the same name.
OPTIONS = ("seed", "size", "frames", "utterances", "speakers", "held_out_speakers",
           "speech_dir", "video", "max_gap", "min_frames", "focal", "crop_scale", "lrs3_dir",
           "workers", "work_dir", "hubert_checkpoint", "face_models", "tfds", "overwrite",
           "progress", "workdir")


def main(argv):
    del argv
    common.require("out", *{"video": ("video",), "lrs3": ("lrs3_dir",)}.get(FLAGS.kind, ()))
    from geneface_jax.data import make
    summary = make.make_dataset(FLAGS.kind, FLAGS.out,
                                **{name: FLAGS[name].value for name in OPTIONS})
    print(json.dumps(summary))


if __name__ == "__main__":
    common.run(main)
