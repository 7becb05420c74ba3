"""The embedded demo as a library function: `run_demo(config, out, ...)` is what
`python -m experiments.demo` runs (its docstring describes the outputs and figures), and
what the test suite calls in process.

Every stage runs in this process through the library's run functions
(`data.make.make_dataset`, `train.audio2motion.train_syncnet` / `train_audio2motion`,
`train.postnet.train_postnet`, `train.nerf.train_nerf` / `evaluate_nerf`,
`pipeline.TalkingFacePipeline`): one JAX start-up, and the stages share what they compile.
Each stage trains with its own config file's preset (`config.stage_preset`), as its command
would with `--config=PRESET --steps=N --seed=S` and the overrides in `stage_configs`.
"""

import functools
import json
import pathlib
import time

from experiments.configs import audio2motion as a2m_configs
from experiments.configs import grid as grid_configs
from experiments.configs import nerf as nerf_configs
from experiments.configs import postnet as postnet_configs
from experiments.configs import syncnet as syncnet_configs

SETTINGS_FILE = "demo_settings.json"
_log = functools.partial(print, flush=True)


def check_settings(out, settings):
    """Records the training settings in `out/demo_settings.json`; refuses (CheckpointError)
    an `out` that holds a demo made with other settings, whose finished stages would
    otherwise be reused as they are."""
    from geneface_jax.errors import CheckpointError
    from geneface_jax.train.metrics import write_json_atomic
    path = out / SETTINGS_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        # A key missing from an older record is a flag left at its default (None).
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise CheckpointError(f"{out}: holds a demo made with other settings (differs "
                                  f"in {diff}); use another --out or the same flags")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, settings)


def stage_configs(config, seed):
    """{stage: its training config}: each stage file's `config.stage_preset` preset with the
    demo's step counts (`run.steps`; the NeRF's `run.torso_steps` too, as `train_nerf
    --steps` sets it), seed and overrides (no periodic evaluation in stage 1, stage 1's
    warm-up within a fifth of its steps, the NeRFs' rays, decay over the run and the
    head's mouth share). `config.nerf_model` picks the renderer's file: `grid`
    (experiments/configs/grid.py, the default) or `mlp` (nerf.py)."""
    c, preset = config, config.stage_preset
    renderer = {"grid": grid_configs, "mlp": nerf_configs}[c.get("nerf_model", "grid")]
    out = {}
    for stage, module in (("syncnet", syncnet_configs), ("audio2motion", a2m_configs),
                          ("postnet", postnet_configs), ("head", renderer),
                          ("torso", renderer)):
        cfg = module.get_config(preset)
        steps = int(c.steps[stage])
        cfg.run.steps, cfg.seed = steps, seed
        if stage in ("head", "torso"):
            cfg.run.torso_steps = steps
            cfg[stage].rays = c.rays
            cfg[stage].lr_decay_steps = max(1, steps)
            if "ambient_ramp_steps" in cfg[stage]:
                cfg[stage].ambient_ramp_steps = max(1, steps)
        out[stage] = cfg
    for stage in ("syncnet", "audio2motion"):
        out[stage].run.eval_every = 0
    out["audio2motion"].optim.warmup = min(200, c.steps.audio2motion // 5)
    for k in ("mouth_percent", "eye_percent", "blink_frame_percent"):
        out["head"].head[k] = c[k]
    return out


class Stages:
    """Runs the demo's stages in order; a stage whose `marker` file exists is finished and
    skipped. `minutes`: each stage's wall-clock minutes (0 when skipped)."""

    def __init__(self, log=_log):
        self.minutes = {}
        self.log = log

    def run(self, name, marker, fn, *args, **kwargs):
        marker = pathlib.Path(marker)
        if marker.is_file():
            self.log(f"[demo] {name}: done ({marker}), skipped")
            self.minutes.setdefault(name, 0.0)
            return
        self.log(f"[demo] {name}: {fn.__module__}.{fn.__name__}")
        t0 = time.time()
        fn(*args, **kwargs)
        self.minutes[name] = (time.time() - t0) / 60.0


def run_demo(config, out, *, audio=None, seed=0, temperature=1.0, pose_mode="loop",
             mesh=None, log=_log):
    """Everything from nothing to a talking-face video (`experiments.demo`).

    Args:
      config: `experiments/configs/demo.py`'s ConfigDict (sizes, step counts).
      out: output directory; finished stages there are skipped, a demo of other settings
        is refused (CheckpointError) before anything runs.
      audio: the audio to synthesize (default: the packaged `en_us_male.wav`).
      seed: of the datasets, every training run and the synthesis.
      temperature, pose_mode: synthesis settings (`pipeline.SynthesisOptions`).
      mesh: the devices every stage splits its work over (default: all).
      log: prints the stage lines.
    Returns:
      the demo's metrics (what `out/metrics.json` holds).
    """
    from geneface_jax import pipeline as pl
    from geneface_jax.audio import io as audio_io
    from geneface_jax.data import format as fmt
    from geneface_jax.data import make
    from geneface_jax.data.synthetic import speech
    from geneface_jax.render import face_tracking
    from geneface_jax.train import audio2motion as a2m
    from geneface_jax.train import nerf
    from geneface_jax.train import postnet

    t0 = time.time()
    c = config
    out = pathlib.Path(out).absolute()
    audio = pathlib.Path(audio) if audio else speech.default_clip()
    audio_io.load_audio(audio)             # bad audio and missing face models fail now,
    tracker = face_tracking.FrameTracker()  # not after training
    data, ck, ev = out / "data", out / "checkpoints", out / "eval"
    settings = dict(c.to_dict(), seed=seed)
    check_settings(out, settings)
    for d in (data, ck, ev):
        d.mkdir(parents=True, exist_ok=True)
    cfg = stage_configs(c, seed)
    st = Stages(log)
    st.run("corpus", data / "corpus" / "meta.json", make.make_dataset, "corpus",
           data / "corpus", seed=seed, utterances=c.corpus.utterances,
           speakers=c.corpus.speakers, held_out_speakers=max(1, c.corpus.speakers // 7),
           tfds=False)
    st.run("person", data / "person" / "meta.json", make.make_dataset, "person",
           data / "person", seed=seed, size=c.person.size, frames=c.person.frames, tfds=False)
    st.run("syncnet", ck / "syncnet" / "metrics.json", a2m.train_syncnet, cfg["syncnet"],
           ck / "syncnet", data / "corpus", mesh=mesh)
    st.run("audio2motion", ck / "audio2motion" / "metrics.json", a2m.train_audio2motion,
           cfg["audio2motion"], ck / "audio2motion", data / "corpus", ck / "syncnet",
           mesh=mesh)
    st.run("postnet", ck / "postnet" / "metrics.json", postnet.train_postnet,
           cfg["postnet"], ck / "postnet", data / "person", ck / "audio2motion", mesh=mesh)
    st.run("head", ck / "head" / "metrics.json", nerf.train_nerf, cfg["head"], ck / "head",
           "head", data / "person", mesh=mesh)
    st.run("torso", ck / "torso" / "metrics.json", nerf.train_nerf, cfg["torso"],
           ck / "torso", "torso", head=ck / "head", mesh=mesh)
    st.run("eval_nerf", ev / "nerf" / "metrics.json", nerf.evaluate_nerf, ck / "head",
           ev / "nerf", torso=ck / "torso", max_frames=c.eval_frames, save_frames=True,
           mesh=mesh)

    person = fmt.load_person(data / "person")
    pl.ReferenceTrack.from_person(person).save(ck / pl.REFERENCE_FILE)
    from geneface_jax.data.face_models import file_sha256
    synthesis = dict(audio=str(audio), audio_sha256=file_sha256(audio),
                     temperature=temperature, pose_mode=pose_mode, seed=seed)
    if (out / "video.mp4").is_file() and (out / "metrics.json").is_file():
        done = json.loads((out / "metrics.json").read_text())
        if done.get("synthesis") == synthesis:
            log(f"[demo] synthesize: done ({out / 'metrics.json'}), skipped")
            return done
    log(f"[demo] synthesize: {audio} -> {out / 'video.mp4'}")
    t_syn = time.time()
    metrics = synthesize_and_score(ck, out, audio, seed, temperature, pose_mode, mesh,
                                   tracker)
    st.minutes["synthesize"] = (time.time() - t_syn) / 60.0
    metrics.update(minutes=(time.time() - t0) / 60.0, stage_minutes=st.minutes,
                   audio=str(audio), settings=settings, synthesis=synthesis)
    from geneface_jax.train import metrics as metrics_lib
    metrics_lib.write_final_metrics(out, metrics)
    return metrics


def synthesize_and_score(ck, out, audio, seed, temperature, pose_mode, mesh, tracker):
    """Synthesizes `audio` to `out/video.mp4` with the checkpoints `ck`, plots
    `out/landmarks.png` and scores the video against the synthetic person's ground truth
    (landmarks, mouth pixels, the face tracker) and the held-out NeRF figures of
    `out/eval/nerf`; returns those figures."""
    from geneface_jax import pipeline as pl
    from geneface_jax.audio import io as audio_io
    from geneface_jax.data.synthetic import world
    pipe = pl.TalkingFacePipeline.load(ck, mesh=mesh)
    res = pipe.synthesize(audio, out / "video.mp4",
                          pl.SynthesisOptions(temperature=temperature, seed=seed,
                                              pose_mode=pose_mode))
    wav = audio_io.load_audio(audio)
    truth = world.person_oracle(seed, wav)
    scores = pl.landmark_scores(res["landmarks"], truth["landmarks"])
    scores_stage1 = pl.landmark_scores(res["stage1"], truth["landmarks"])
    lip, lip_frame_boxes = (pl.lip_energy_correlation(
        out / "video.mp4", res["landmarks"], pipe.reference.poses[res["track"]],
        pipe.reference.intrinsics, res["energy"], box_size=size) for size in ("video", "frame"))
    plot_landmarks(out / "landmarks.png", wav, res, truth)
    video = pl.tracked_video_report(out / "video.mp4", res["landmarks"], truth["landmarks"],
                                    tracker=tracker)
    nerf = json.loads((out / "eval" / "nerf" / "metrics.json").read_text())
    return dict(
        lmd=scores["lmd"], lmd_mouth=scores["lmd_mouth"], sync_corr=scores["sync_corr"],
        lmd_mouth_stage1=scores_stage1["lmd_mouth"],
        sync_corr_stage1=scores_stage1["sync_corr"], lip_energy_corr=lip,
        lip_energy_corr_frame_boxes=lip_frame_boxes,
        psnr_full=nerf["psnr_full"], psnr_head=nerf["psnr_head"],
        ssim_full=nerf["ssim_full"], mouth_control_ratio=nerf["mouth_control_ratio"],
        video_face_found=video["face_found"], tracked_sync_r=video["tracked_sync_r"],
        tracked_oracle_r=video["tracked_oracle_r"],
        **{k: v for k, v in nerf.items() if k.startswith(("tracked_", "floor_"))},
        frames=res["frames"], seconds=res["seconds"], render_fps=res["render_fps"])


def metrics_line(metrics):
    """The demo's last output line: its figures as one JSON object."""
    return json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in
                       metrics.items() if k not in ("stage_minutes", "settings", "synthesis")})


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
