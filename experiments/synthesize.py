r"""Speech audio -> talking-face mp4 with trained checkpoints.

  python -m experiments.synthesize --audio=speech.wav --checkpoints=demo_out/checkpoints \
      --out=out.mp4 [--temperature=1.0] [--seed=0] \
      [--pose=loop|mirror|static[:FRAME]|FILE] [--blink=track|auto|none] \
      [--[no]paste_back] [--source_video=FILE]

`--checkpoints` is a directory with the stage runs `audio2motion/`, `postnet/`, `head/`,
`torso/` (optional) and `reference.npz`, as `experiments.demo` writes it
(`geneface_jax.pipeline` documents the layout). Any audio librosa can read (WAV, FLAC,
MP3, OGG; any rate, mono or stereo). The video has round(duration x 25) frames at 25 fps,
the audio muxed in. Head pose: `--pose=loop|mirror` replays the person's reference video
(forwards and over again / back and forth; `--pose_mode` is the older name),
`static[:FRAME]` holds reference frame FRAME (0), FILE takes the poses of a person dataset,
a video (tracked on the fly) or an `.npy` of `[N, 4, 4]` camera-to-head poses
(`geneface_jax.data.head_poses`; poses beyond the training range are warned about).
Blinks: `--blink=track` copies the reference frames' eyes, `auto` draws a natural seeded
schedule (`geneface_jax.data.blinks`), `none` holds the eyes open. Paste-back (default on
for a person made from a video whose file is still where preprocessing read it): the
video is written at the source's size, each rendered crop blended into its source frame
(`geneface_jax.render.paste`); a changed or moved file is refused by name
(`--source_video` points at a moved one, `--nopaste_back` writes the crop). A progress
line shows frames/s and the ETA. With `--landmarks`, the predicted landmarks (stage 1,
post-net, rendered) go to an `.npz` beside the video. With `--report`, the written video
is tracked with the face tracker (`pipeline.tracked_video_report`, docs/tracking_metric.md)
and the JSON line adds `face_found` (share of frames where a face is found) and
`tracked_sync_r` (r of the tracked mouth opening with the rendered landmarks' opening); for
a synthetic person also `tracked_oracle_r` (with the person's true mouth for this audio).
The work is `geneface_jax.pipeline.synthesize`.

Bad input (not audio, empty, missing files, checkpoints of another stage or that do not
belong together, an unwritable output) prints one `error:` line and exits with status 2;
no output file is left behind.
"""

import json

from absl import flags

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("audio", None, "Input audio file.")
flags.DEFINE_string("checkpoints", None, "Directory of the trained stage runs.")
flags.DEFINE_string("out", None, "Output mp4 path.")
flags.DEFINE_float("temperature", 1.0, "Stage-1 prior temperature (0: mode path).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_enum("pose_mode", "loop", ["loop", "mirror"],
                  "Alias of --pose=loop|mirror (when --pose is not given).")
flags.DEFINE_string("pose", "", "loop | mirror | static[:FRAME] | FILE (a person dataset, a "
                    "video, or an .npy of [N, 4, 4] poses); default: --pose_mode.")
flags.DEFINE_enum("blink", "track", ["track", "auto", "none"],
                  "Eyes: from the reference frames, a natural seeded schedule, or open.")
flags.DEFINE_bool("paste_back", None, "Write the video in the source video's full frames "
                  "(default: when the person came from a video that is still there).")
flags.DEFINE_string("source_video", "", "The person's source video, if it moved.")
flags.DEFINE_float("silence_db", -50.0, "dBFS below which the mouth is closed.")
flags.DEFINE_integer("frames_per_chunk", 25, "Frames rendered and encoded per chunk.")
flags.DEFINE_integer("chunk", 4096, "Rays per device evaluated at once.")
flags.DEFINE_integer("head_samples", 0, "Samples per ray of the grid head (0: as trained; "
                     "fewer render faster and less sharply, a preview setting).")
flags.DEFINE_bool("full_frame", False, "Ray-trace every pixel (default: only the region "
                  "the person covers in their video; the rest is the static background).")
flags.DEFINE_integer("max_frames", 0, "Render only the first N frames (0: all).")
flags.DEFINE_integer("crf", 18, "H.264 constant rate factor.")
flags.DEFINE_string("hubert_checkpoint", None, "HuBERT checkpoint directory, when stage 1 "
                    "was trained on HuBERT features.")
flags.DEFINE_bool("landmarks", False, "Also write OUT.landmarks.npz.")
flags.DEFINE_bool("report", False, "Track the written video with the face tracker and "
                  "report face_found and tracked_sync_r (needs the face models).")


def main(argv):
    del argv
    common.require("audio", "checkpoints", "out")
    from geneface_jax import pipeline as pl
    options = pl.SynthesisOptions(
        temperature=FLAGS.temperature, seed=FLAGS.seed, pose_mode=FLAGS.pose_mode,
        silence_db=FLAGS.silence_db, frames_per_chunk=FLAGS.frames_per_chunk,
        render_chunk=FLAGS.chunk, head_samples=FLAGS.head_samples,
        full_frame=FLAGS.full_frame, max_frames=FLAGS.max_frames,
        crf=FLAGS.crf, pose=FLAGS.pose, blink=FLAGS.blink, paste_back=FLAGS.paste_back,
        source_video=FLAGS.source_video)
    print(json.dumps(pl.synthesize(FLAGS.audio, FLAGS.checkpoints, FLAGS.out, options,
                                   hubert_checkpoint=FLAGS.hubert_checkpoint,
                                   save_landmarks=FLAGS.landmarks, report=FLAGS.report)))


if __name__ == "__main__":
    common.run(main)
