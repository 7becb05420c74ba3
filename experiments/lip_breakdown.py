r"""Where lip sync is lost between the audio and the rendered mouth (synthetic person).

  python -m experiments.lip_breakdown --checkpoints=demo_out/checkpoints \
      [--audio=speech.wav] [--temperature=1.0] [--seed=0]

Renders (no video written) the predicted landmarks of the audio, the synthetic person's
ground-truth landmarks of the same audio (`world.person_oracle`) and the person's own
reference frames through the trained NeRF, and prints one JSON line
(`pipeline.lip_sync_breakdown`): for `predicted` and `oracle`, `pixels_energy` (the demo's
`lip_energy_corr`), `pixels_opening` (how faithfully the NeRF draws the landmarks' mouth
opening) and `opening_energy`; `reference_pixels_opening` (the NeRF on the person's own
landmarks). The oracle's `pixels_energy` is the most the renderer lets `lip_energy_corr`
reach with perfect landmarks; `truth` is the same heuristic on the person's ground-truth
video of the audio (`world.person_saying`, along the same reference track): the most any
renderer could reach. With `--track` (default) each rendering is also tracked with
the face tracker: `face_found` and `tracked_opening` (the tracked mouth opening vs the
landmarks', docs/tracking_metric.md), and `reference_tracked_opening`. Needs checkpoints
trained on a synthetic person (`make_dataset --kind=person`, its seed is read from the
dataset).
"""

import json
import pathlib

from absl import flags

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoints", None, "Directory of the trained stage runs.")
flags.DEFINE_string("audio", None, "Input audio file (default: the packaged en_us_male.wav).")
flags.DEFINE_float("temperature", 1.0, "Stage-1 prior temperature.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("max_frames", 0, "Use only the first N frames (0: all).")
flags.DEFINE_integer("own_frames", 50, "Reference frames rendered for the NeRF's own check.")
flags.DEFINE_bool("track", True, "Also track the renders with the face tracker (needs the "
                  "face models).")


def main(argv):
    del argv
    common.require("checkpoints")
    from geneface_jax import pipeline as pl
    from geneface_jax.audio import io as audio_io
    from geneface_jax.data.synthetic import speech, world
    from geneface_jax.errors import DatasetError

    audio = FLAGS.audio or str(speech.default_clip())
    samples = audio_io.load_audio(audio)
    tracker = None
    if FLAGS.track:                        # missing face models fail before rendering
        from geneface_jax.render import face_tracking
        tracker = face_tracking.FrameTracker()
    pipe = pl.TalkingFacePipeline.load(FLAGS.checkpoints)
    data = pipe.head_run.get("data")
    meta_path = pathlib.Path(data or "") / "meta.json"
    meta = json.loads(meta_path.read_text()) if data and meta_path.is_file() else {}
    if meta.get("source") != "synthetic" or "seed" not in meta:
        raise DatasetError(f"{FLAGS.checkpoints}: the head run's person dataset ({data}) is "
                           "not a synthetic person: no ground-truth landmarks to compare")
    oracle = world.person_oracle(int(meta["seed"]), samples)["landmarks"]
    options = pl.SynthesisOptions(temperature=FLAGS.temperature, seed=FLAGS.seed,
                                  max_frames=FLAGS.max_frames)
    n = len(oracle) if not FLAGS.max_frames else min(len(oracle), FLAGS.max_frames)
    ref = pipe.reference                  # the person's train split: frames [lo, hi)
    lo = int(meta["splits"]["train"][0])
    total = max(int(end) for _, end in meta["splits"].values())
    truth = world.person_saying(int(meta["seed"]), samples,
                                lo + pl.track_indices(n, len(ref), options.pose_mode),
                                size=ref.height, num_frames=total, progress=True)
    out = pl.lip_sync_breakdown(pipe, samples, oracle, own_frames=FLAGS.own_frames,
                                tracker=tracker, options=options, truth_frames=truth)
    print(json.dumps(dict(out, audio=audio, temperature=FLAGS.temperature,
                          seed=FLAGS.seed)))


if __name__ == "__main__":
    common.run(main)
