r"""The embedded default: everything from nothing to a talking-face video, on this machine.

  python -m experiments.demo [--out=demo_out] [--audio=FILE]

1. makes the synthetic multi-speaker corpus and the target person (`make_dataset`);
2. trains SyncNet, stage 1 (VAE + flow prior), stage 2 (post-net), the head NeRF and the
   head-aware torso NeRF with the small CPU configs (`train_*`), and scores the NeRF on
   the person's held-out frames (`eval_nerf`);
3. synthesizes `--audio` (default: the shipped `en_us_male.wav`) with
   `geneface_jax.pipeline` and scores the result against the synthetic person's ground
   truth for that audio (`data.synthetic.world.person_oracle`).

Writes to `--out`: `video.mp4`, `checkpoints/` (`audio2motion/ postnet/ head/ torso/
reference.npz`: what `synthesize --checkpoints` takes; `syncnet/` too), `data/`
(datasets), `eval/` (stage evaluations), `landmarks.png` (predicted vs ground-truth mouth
opening over time, under the waveform) and `metrics.json`:

  lmd, lmd_mouth    mean L2 distance (head units) between the rendered landmarks and the
                    ground truth of the person saying the audio (all 68 / mouth points)
  sync_corr         Pearson r of predicted vs ground-truth mouth opening
  lip_energy_corr   Pearson r of the decoded video's mouth-region darkening
                    (`pipeline.mouth_pixel_activity`) with the audio energy (dB)
  psnr_full, psnr_head, ssim_full, mouth_control_ratio   `eval_nerf` on held-out frames
  frames, seconds, render_fps, minutes (whole demo), stage_minutes

Every stage checkpoints into its directory and is skipped when finished, so a second run
(or a run after an interruption) only does what is left; the synthesis too is skipped when
`metrics.json` records the same audio (path and content), temperature, pose mode and seed. Changing the training flags
between runs on one `--out` is refused (`demo_settings.json` records them); `--audio`,
`--temperature` and `--pose_mode` only change the synthesis. `--quick` is a tiny configuration (64 px,
a few hundred steps) for smoke runs; it does not make a good video.
"""

import json
import os
import pathlib
import subprocess
import sys
import time

from absl import flags

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "demo_out", "Output directory.")
flags.DEFINE_string("audio", None, "Audio to synthesize (default: the shipped "
                    "en_us_male.wav).")
flags.DEFINE_integer("seed", 0, "Seed of the datasets and of every training run.")
flags.DEFINE_integer("size", 96, "Person video size in pixels.")
flags.DEFINE_integer("frames", 250, "Person video frames.")
flags.DEFINE_integer("utterances", 200, "Corpus utterances.")
flags.DEFINE_integer("speakers", 20, "Corpus speakers.")
flags.DEFINE_integer("syncnet_steps", 800, "SyncNet training steps.")
flags.DEFINE_integer("a2m_steps", 1000, "Stage-1 training steps.")
flags.DEFINE_integer("postnet_steps", 1000, "Stage-2 training steps.")
flags.DEFINE_integer("head_steps", 700, "Head NeRF training steps.")
flags.DEFINE_integer("torso_steps", 120, "Torso NeRF training steps.")
flags.DEFINE_integer("rays", 1024, "Rays per NeRF training step.")
flags.DEFINE_integer("nerf_width", None, "Head and torso density MLP width (default: the "
                     "small config's, 128).")
flags.DEFINE_integer("nerf_depth", None, "Density MLP layers (default 6); the skip "
                     "connection goes after layer depth // 2.")
flags.DEFINE_integer("nerf_samples", None, "Coarse and fine samples per ray, each (default "
                     "24).")
flags.DEFINE_float("mouth_percent", 0.25, "Share of the head's rays drawn in the mouth box.")
flags.DEFINE_integer("eval_frames", 4, "Held-out frames scored by eval_nerf.")
flags.DEFINE_float("temperature", 1.0, "Stage-1 prior temperature at synthesis.")
flags.DEFINE_enum("pose_mode", "loop", ["loop", "mirror"], "Reference pose track mode.")
flags.DEFINE_bool("quick", False, "Tiny sizes and step counts (smoke runs, notebooks).")

QUICK = dict(size=64, frames=100, utterances=48, speakers=8, syncnet_steps=150,
             a2m_steps=300, postnet_steps=200, head_steps=300, torso_steps=60, rays=512,
             eval_frames=2)


def settings():
    """The effective sizes: the flags, or QUICK for flags left at their defaults."""
    names = ("size", "frames", "utterances", "speakers", "syncnet_steps", "a2m_steps",
             "postnet_steps", "head_steps", "torso_steps", "rays", "mouth_percent",
             "eval_frames", "nerf_width", "nerf_depth", "nerf_samples")
    out = {n: getattr(FLAGS, n) for n in names}
    if FLAGS.quick:
        out.update({n: v for n, v in QUICK.items() if not FLAGS[n].present})
    return out


def nerf_size_flags(s):
    """`train_nerf` config overrides (`config.model.*`) from the demo's `--nerf_*` settings
    (None: the cpu preset's value)."""
    depth = s["nerf_depth"]
    sizes = dict(width=s["nerf_width"], depth=depth, num_coarse=s["nerf_samples"],
                 num_fine=s["nerf_samples"],
                 skip=None if depth is None else max(0, min(depth // 2, depth - 2)))
    return {f"config.model.{k}": v for k, v in sizes.items()}


def check_nerf_sizes(s):
    """InputError unless the `--nerf_*` sizes make a valid NeRF configuration."""
    from experiments.configs import nerf as nerf_presets
    from geneface_jax.errors import InputError
    from geneface_jax.render import fields
    if s["nerf_depth"] is not None and s["nerf_depth"] < 2:
        raise InputError(f"--nerf_depth must be >= 2 (the skip connection goes after "
                         f"layer depth // 2), got {s['nerf_depth']}")
    sizes = {k.rsplit(".", 1)[1]: v for k, v in nerf_size_flags(s).items() if v is not None}
    try:
        fields.NeRFConfig(**dict(nerf_presets.get_config("cpu").model.to_dict(), **sizes))
    except (TypeError, ValueError) as e:
        raise InputError(f"--nerf_width/--nerf_depth/--nerf_samples: {e}") from e


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
    from geneface_jax.train import metrics as metrics_lib

    t0 = time.time()
    s = settings()
    out = pathlib.Path(FLAGS.out).absolute()
    audio = pathlib.Path(FLAGS.audio) if FLAGS.audio else speech.default_clip()
    check_nerf_sizes(s)                        # bad sizes and bad audio fail now, not
    audio_io.load_audio(audio)                 # after training
    data, ck, ev = out / "data", out / "checkpoints", out / "eval"
    seed = FLAGS.seed
    check_settings(out, dict(s, seed=seed))
    for d in (data, ck, ev):
        d.mkdir(parents=True, exist_ok=True)
    st = Stages()
    st.run("corpus", data / "corpus" / "meta.json", "make_dataset", kind="corpus",
           out=data / "corpus", seed=seed, utterances=s["utterances"],
           speakers=s["speakers"], held_out_speakers=max(1, s["speakers"] // 7), tfds=False)
    st.run("person", data / "person" / "meta.json", "make_dataset", kind="person",
           out=data / "person", seed=seed, size=s["size"], frames=s["frames"], tfds=False)
    st.run("syncnet", ck / "syncnet" / "metrics.json", "train_syncnet", data=data / "corpus",
           workdir=ck / "syncnet", config="cpu", steps=s["syncnet_steps"], seed=seed,
           **{"config.run.eval_every": 0})
    st.run("audio2motion", ck / "audio2motion" / "metrics.json", "train_audio2motion",
           data=data / "corpus", workdir=ck / "audio2motion", syncnet=ck / "syncnet",
           config="cpu", steps=s["a2m_steps"], seed=seed,
           **{"config.run.eval_every": 0, "config.optim.warmup": min(200, s["a2m_steps"] // 5)})
    st.run("postnet", ck / "postnet" / "metrics.json", "train_postnet", data=data / "person",
           audio2motion=ck / "audio2motion", workdir=ck / "postnet", config="cpu",
           steps=s["postnet_steps"], seed=seed)
    sizes = nerf_size_flags(s)
    st.run("head", ck / "head" / "metrics.json", "train_nerf", part="head",
           data=data / "person", workdir=ck / "head", config="cpu", steps=s["head_steps"],
           seed=seed, **{"config.head.rays": s["rays"],
                         "config.head.lr_decay_steps": s["head_steps"],
                         "config.head.mouth_percent": s["mouth_percent"]}, **sizes)
    st.run("torso", ck / "torso" / "metrics.json", "train_nerf", part="torso",
           head=ck / "head", workdir=ck / "torso", config="cpu", steps=s["torso_steps"],
           seed=seed, **{"config.torso.rays": s["rays"],
                         "config.torso.lr_decay_steps": max(1, s["torso_steps"])}, **sizes)
    st.run("eval_nerf", ev / "nerf" / "metrics.json", "eval_nerf", head=ck / "head",
           torso=ck / "torso", workdir=ev / "nerf", max_frames=s["eval_frames"])

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
    nerf = json.loads((ev / "nerf" / "metrics.json").read_text())
    metrics = dict(
        lmd=scores["lmd"], lmd_mouth=scores["lmd_mouth"], sync_corr=scores["sync_corr"],
        lmd_mouth_stage1=scores_stage1["lmd_mouth"],
        sync_corr_stage1=scores_stage1["sync_corr"], lip_energy_corr=lip,
        psnr_full=nerf["psnr_full"], psnr_head=nerf["psnr_head"],
        ssim_full=nerf["ssim_full"], mouth_control_ratio=nerf["mouth_control_ratio"],
        frames=res["frames"], seconds=res["seconds"], render_fps=res["render_fps"],
        minutes=(time.time() - t0) / 60.0, stage_minutes=st.minutes,
        audio=str(audio), settings=s, quick=FLAGS.quick, synthesis=synthesis)
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
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


if __name__ == "__main__":
    common.run(main)
