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
                    (`pipeline.mouth_pixel_activity`) with the audio energy (dB)
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
`--temperature` and `--pose_mode` only change the synthesis.
"""

import json
import pathlib
import subprocess
import sys
import time

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


def check_settings(out, settings):
    """Records the training settings in `out/demo_settings.json`; refuses (CheckpointError)
    an `out` that holds a demo made with other settings, whose finished stages would
    otherwise be reused as they are."""
    from geneface_jax.errors import CheckpointError
    from geneface_jax.train.metrics import write_json_atomic
    path = out / "demo_settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        # A key missing from an older record is a flag left at its default (None).
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise CheckpointError(f"{out}: holds a demo made with other settings (differs "
                                  f"in {diff}); use another --out or the same flags")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, settings)


class Stages:
    """Runs `python -m experiments.<module>` once per stage; a stage whose `marker` file
    exists is finished and skipped."""

    def __init__(self):
        self.minutes = {}

    def run(self, name, marker, module, **flag_values):
        marker = pathlib.Path(marker)
        if marker.is_file():
            print(f"[demo] {name}: done ({marker}), skipped", flush=True)
            self.minutes.setdefault(name, 0.0)
            return
        args = [f"--{k}={v}" for k, v in flag_values.items() if v is not None]
        print(f"[demo] {name}: python -m experiments.{module} {' '.join(args)}", flush=True)
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", f"experiments.{module}", *args])
        if proc.returncode != 0:
            print(f"error: demo stage {name!r} failed (exit status {proc.returncode})",
                  file=sys.stderr)
            sys.exit(proc.returncode)
        self.minutes[name] = (time.time() - t0) / 60.0


def main(argv):
    del argv
    from geneface_jax import pipeline as pl
    from geneface_jax.audio import io as audio_io
    from geneface_jax.data import format as fmt
    from geneface_jax.data.synthetic import speech
    from geneface_jax.data.synthetic import world
    from geneface_jax.render import face_tracking
    from geneface_jax.train import metrics as metrics_lib

    t0 = time.time()
    c = FLAGS.config
    out = pathlib.Path(FLAGS.out).absolute()
    audio = pathlib.Path(FLAGS.audio) if FLAGS.audio else speech.default_clip()
    audio_io.load_audio(audio)             # bad audio and missing face models fail now,
    tracker = face_tracking.FrameTracker()  # not after training
    data, ck, ev = out / "data", out / "checkpoints", out / "eval"
    seed = FLAGS.seed
    settings = dict(c.to_dict(), seed=seed)
    check_settings(out, settings)
    for d in (data, ck, ev):
        d.mkdir(parents=True, exist_ok=True)
    st = Stages()
    stage = c.stage_preset
    st.run("corpus", data / "corpus" / "meta.json", "make_dataset", kind="corpus",
           out=data / "corpus", seed=seed, utterances=c.corpus.utterances,
           speakers=c.corpus.speakers, held_out_speakers=max(1, c.corpus.speakers // 7),
           tfds=False)
    st.run("person", data / "person" / "meta.json", "make_dataset", kind="person",
           out=data / "person", seed=seed, size=c.person.size, frames=c.person.frames,
           tfds=False)
    st.run("syncnet", ck / "syncnet" / "metrics.json", "train_syncnet", data=data / "corpus",
           workdir=ck / "syncnet", config=stage, steps=c.steps.syncnet, seed=seed,
           **{"config.run.eval_every": 0})
    st.run("audio2motion", ck / "audio2motion" / "metrics.json", "train_audio2motion",
           data=data / "corpus", workdir=ck / "audio2motion", syncnet=ck / "syncnet",
           config=stage, steps=c.steps.audio2motion, seed=seed,
           **{"config.run.eval_every": 0,
              "config.optim.warmup": min(200, c.steps.audio2motion // 5)})
    st.run("postnet", ck / "postnet" / "metrics.json", "train_postnet", data=data / "person",
           audio2motion=ck / "audio2motion", workdir=ck / "postnet", config=stage,
           steps=c.steps.postnet, seed=seed)
    st.run("head", ck / "head" / "metrics.json", "train_nerf", part="head",
           data=data / "person", workdir=ck / "head", config=stage, steps=c.steps.head,
           seed=seed, **{"config.head.rays": c.rays,
                         "config.head.lr_decay_steps": c.steps.head,
                         "config.head.mouth_percent": c.mouth_percent})
    st.run("torso", ck / "torso" / "metrics.json", "train_nerf", part="torso",
           head=ck / "head", workdir=ck / "torso", config=stage, steps=c.steps.torso,
           seed=seed, **{"config.torso.rays": c.rays,
                         "config.torso.lr_decay_steps": max(1, c.steps.torso)})
    st.run("eval_nerf", ev / "nerf" / "metrics.json", "eval_nerf", head=ck / "head",
           torso=ck / "torso", workdir=ev / "nerf", max_frames=c.eval_frames,
           save_frames=True)

    person = fmt.load_person(data / "person")
    pl.ReferenceTrack.from_person(person).save(ck / pl.REFERENCE_FILE)

    from geneface_jax.data.face_models import file_sha256
    synthesis = dict(audio=str(audio), audio_sha256=file_sha256(audio),
                     temperature=FLAGS.temperature, pose_mode=FLAGS.pose_mode, seed=seed)
    if (out / "video.mp4").is_file() and (out / "metrics.json").is_file():
        done = json.loads((out / "metrics.json").read_text())
        if done.get("synthesis") == synthesis:
            print(f"[demo] synthesize: done ({out / 'metrics.json'}), skipped", flush=True)
            print_metrics(done)
            return
    print(f"[demo] synthesize: {audio} -> {out / 'video.mp4'}", flush=True)
    t_syn = time.time()
    pipe = pl.TalkingFacePipeline.load(ck)
    res = pipe.synthesize(audio, out / "video.mp4",
                          pl.SynthesisOptions(temperature=FLAGS.temperature, seed=seed,
                                              pose_mode=FLAGS.pose_mode))
    st.minutes["synthesize"] = (time.time() - t_syn) / 60.0

    wav = audio_io.load_audio(audio)
    truth = world.person_oracle(seed, wav)
    scores = pl.landmark_scores(res["landmarks"], truth["landmarks"])
    scores_stage1 = pl.landmark_scores(res["stage1"], truth["landmarks"])
    lip = pl.lip_energy_correlation(out / "video.mp4", res["landmarks"],
                                    pipe.reference.poses[res["track"]],
                                    pipe.reference.intrinsics, res["energy"])
    plot_landmarks(out / "landmarks.png", wav, res, truth)
    video = pl.tracked_video_report(out / "video.mp4", res["landmarks"], truth["landmarks"],
                                    tracker=tracker)
    nerf = json.loads((ev / "nerf" / "metrics.json").read_text())
    metrics = dict(
        lmd=scores["lmd"], lmd_mouth=scores["lmd_mouth"], sync_corr=scores["sync_corr"],
        lmd_mouth_stage1=scores_stage1["lmd_mouth"],
        sync_corr_stage1=scores_stage1["sync_corr"], lip_energy_corr=lip,
        psnr_full=nerf["psnr_full"], psnr_head=nerf["psnr_head"],
        ssim_full=nerf["ssim_full"], mouth_control_ratio=nerf["mouth_control_ratio"],
        video_face_found=video["face_found"], tracked_sync_r=video["tracked_sync_r"],
        tracked_oracle_r=video["tracked_oracle_r"],
        **{k: v for k, v in nerf.items() if k.startswith(("tracked_", "floor_"))},
        frames=res["frames"], seconds=res["seconds"], render_fps=res["render_fps"],
        minutes=(time.time() - t0) / 60.0, stage_minutes=st.minutes,
        audio=str(audio), settings=settings, synthesis=synthesis)
    metrics_lib.write_final_metrics(out, metrics)
    print_metrics(metrics)


def print_metrics(metrics):
    """The demo's last line: its figures as one JSON object."""
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in
                      metrics.items() if k not in ("stage_minutes", "settings", "synthesis")}))


def plot_landmarks(path, wav, res, truth):
    """landmarks.png: waveform on top; predicted (rendered and stage-1) vs ground-truth
    mouth opening (head units) over time below."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from geneface_jax import files
    from geneface_jax.audio import features as feat
    from geneface_jax.data import landmarks as lm

    n = res["frames"]
    t = np.arange(n) / feat.VIDEO_FPS
    fig, (ax_w, ax_m) = plt.subplots(2, 1, figsize=(10, 5), sharex=True,
                                     gridspec_kw=dict(height_ratios=[1, 2]))
    ax_w.plot(np.arange(len(wav)) / feat.SAMPLE_RATE, wav, lw=0.4, color="0.3")
    ax_w.set_ylabel("audio")
    ax_m.plot(t, lm.mouth_opening(truth["landmarks"][:n]), label="ground truth", color="k")
    ax_m.plot(t, lm.mouth_opening(res["stage1"]), label="stage 1", alpha=0.6)
    ax_m.plot(t, lm.mouth_opening(res["landmarks"]), label="rendered (post-net)")
    ax_m.set_xlabel("time (s)")
    ax_m.set_ylabel("mouth opening (head units)")
    ax_m.legend(loc="upper right")
    fig.tight_layout()
    with files.atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    common.run(main)
