r"""The embedded default: everything from nothing to a talking-face video, on this machine.

  python -m experiments.demo [--out=demo_out] [--audio=FILE] [--config=cpu|quick|tiny]

1. makes the synthetic multi-speaker corpus and the target person (`make_dataset`);
2. trains SyncNet, stage 1 (VAE + flow prior), stage 2 (post-net), the head NeRF and the
   head-aware torso NeRF (`train_*`, each stage's preset named by the demo's config), and
   scores the NeRF on the person's held-out frames (`eval_nerf`, with the face tracker);
3. synthesizes `--audio` (default: the packaged `en_us_male.wav`) with
   `geneface_jax.pipeline`, scores the result against the synthetic person's ground
   truth for that audio (`data.synthetic.world.person_oracle`) and tracks the video.

Sizes and step counts: `experiments/configs/demo.py` (presets cpu, the default; quick;
tiny, the test suite's). The face models must be fetched once
(`python -m geneface_jax.data.face_models --fetch`); the demo checks that first.

Writes to `--out`: `video.mp4`, `checkpoints/` (`audio2motion/ postnet/ head/ torso/
reference.npz`: what `synthesize --checkpoints` takes; `syncnet/` too), `data/`
(datasets), `eval/` (stage evaluations; `eval/nerf/frames.png`: held-out renders over the
ground truth), `landmarks.png` (predicted vs ground-truth mouth opening over time, under
the waveform) and `metrics.json`:

  lmd, lmd_mouth    mean L2 distance (head units) between the rendered landmarks and the
                    ground truth of the person saying the audio (all 68 / mouth points)
  sync_corr         Pearson r of predicted vs ground-truth mouth opening
  lip_energy_corr   Pearson r of the decoded video's mouth-region darkening
                    (`pipeline.mouth_pixel_activity`, boxes of one size around the lips)
                    with the audio energy (dB); `lip_energy_corr_frame_boxes`: the same
                    in boxes that grow with the lips (the figure before 2026-12-07, which
                    reads 0.54 on the person's ground-truth video: docs/demo.md)
  video_face_found, tracked_sync_r, tracked_oracle_r
                    the video tracked with the face tracker: share of frames with a face,
                    r of the tracked mouth opening with the rendered landmarks' and with
                    the ground truth's (`pipeline.tracked_video_report`)
  psnr_full, psnr_head, ssim_full, mouth_control_ratio, tracked_*, floor_*
                    `eval_nerf` on the held-out frames (docs/tracking_metric.md)
  frames, seconds, render_fps, minutes (whole demo), stage_minutes

Every stage checkpoints into its directory and is skipped when finished, so a second run
(or a run after an interruption) only does what is left; the synthesis too is skipped when
`metrics.json` records the same audio (path and content), temperature, pose mode and seed.
Another config on the same `--out` is refused (`demo_settings.json` records it); `--audio`,
`--temperature` and `--pose_mode` only change the synthesis. Every stage runs in this
process (`experiments.demo_lib.run_demo`).
"""

from absl import flags

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "demo_out", "Output directory.")
flags.DEFINE_string("audio", None, "Audio to synthesize (default: the packaged "
                    "en_us_male.wav).")
flags.DEFINE_integer("seed", 0, "Seed of the datasets and of every training run.")
flags.DEFINE_float("temperature", 1.0, "Stage-1 prior temperature at synthesis.")
flags.DEFINE_enum("pose_mode", "loop", ["loop", "mirror"], "Reference pose track mode.")
common.define_config_flag("demo", default="cpu", presets="cpu, quick, tiny")


def main(argv):
    del argv
    from experiments import demo_lib
    metrics = demo_lib.run_demo(FLAGS.config, FLAGS.out, audio=FLAGS.audio, seed=FLAGS.seed,
                                temperature=FLAGS.temperature, pose_mode=FLAGS.pose_mode)
    print(demo_lib.metrics_line(metrics))


if __name__ == "__main__":
    common.run(main)
