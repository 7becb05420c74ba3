r"""Synthesis host memory vs the audio's length: peak RSS for 1 and 10 minutes of speech.

  python -m experiments.bench.synthesis_memory [--workdir=/tmp/geneface-synthesis-memory]
      [--minutes=1,10]

Builds a set of tiny checkpoints once in `--workdir/checkpoints` (each stage skipped when
its `metrics.json` is there): the synthetic corpus and person and every training entry
point on its `tiny` preset with the tiny demo's sizes and steps
(`experiments/configs/demo.py`), then `reference.npz`, as `experiments.demo` does. Each
duration's audio is the four packaged speech clips in turn, repeated to length (16 kHz WAV).
Each synthesis runs in a fresh process (`--child`) with the host allocator tuned as
`experiments.synthesize` runs it (`common.tune_host_malloc`): `TalkingFacePipeline.load`,
then `synthesize` to an mp4 with the default options. That process reports its peak RSS
(`VmHWM`) after loading, after the first chunk (features, stages 1 and 2 done: the
landmarks of the whole clip exist) and at the end.

Bar: the longest duration's peak RSS within 20 % of the shortest's (`ratio`). The last
line printed is one JSON object.
"""

import json
import os
import pathlib
import subprocess
import sys
import time

from absl import app
from absl import flags

from experiments.bench import harness

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "/tmp/geneface-synthesis-memory",
                    "Checkpoints, audio and videos (checkpoints are reused across runs).")
flags.DEFINE_list("minutes", ["1", "10"], "Audio durations in minutes.")
flags.DEFINE_bool("child", False, "Internal: synthesize --audio with --checkpoints once.")
flags.DEFINE_string("audio", None, "Internal (--child): the audio file.")
flags.DEFINE_string("out", None, "Internal (--child): the output mp4.")

BAR = 1.20          # longest / shortest peak RSS


def _status_kb(field):
    """A `/proc/self/status` field in kB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _mb(kb):
    return round(kb / 1024.0, 1)


def child():
    from experiments import common
    malloc = common.host_malloc_setting(False)
    from geneface_jax import pipeline as pl
    t0 = time.time()
    pipe = pl.TalkingFacePipeline.load(pathlib.Path(FLAGS.workdir) / "checkpoints")
    marks = {"after_load_mb": _mb(_status_kb("VmHWM"))}

    def progress(done, total, fps):
        if "after_first_chunk_mb" not in marks:
            marks["after_first_chunk_mb"] = _mb(_status_kb("VmHWM"))

    res = pipe.synthesize(FLAGS.audio, FLAGS.out, pl.SynthesisOptions(), progress=progress)
    print(json.dumps(dict(marks, peak_mb=_mb(_status_kb("VmHWM")),
                          rss_end_mb=_mb(_status_kb("VmRSS")), frames=int(res["frames"]),
                          seconds=round(float(res["seconds"]), 2),
                          render_fps=round(float(res["render_fps"]), 1),
                          minutes=round((time.time() - t0) / 60.0, 2), host_malloc=malloc)))


def _run(name, marker, module, **flag_values):
    if pathlib.Path(marker).is_file():
        return 0.0
    args = [f"--{k}={v}" for k, v in flag_values.items()]
    print(f"[bench] {name}: python -m experiments.{module} {' '.join(args)}", file=sys.stderr,
          flush=True)
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", f"experiments.{module}", *args],
                       capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"error: {name} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return time.time() - t0


def build_checkpoints(root):
    """The tiny demo's datasets and stage runs under `root` (skipping finished ones)."""
    from experiments.configs import demo as demo_presets
    c = demo_presets.get_config("tiny")
    data, ck = root / "data", root / "checkpoints"
    seconds = 0.0
    seconds += _run("corpus", data / "corpus" / "meta.json", "make_dataset", kind="corpus",
                    out=data / "corpus", seed=0, utterances=c.corpus.utterances,
                    speakers=c.corpus.speakers,
                    held_out_speakers=max(1, c.corpus.speakers // 7), tfds=False)
    seconds += _run("person", data / "person" / "meta.json", "make_dataset", kind="person",
                    out=data / "person", seed=0, size=c.person.size,
                    frames=c.person.frames, tfds=False)
    stage = c.stage_preset
    seconds += _run("syncnet", ck / "syncnet" / "metrics.json", "train_syncnet",
                    data=data / "corpus", workdir=ck / "syncnet", config=stage,
                    steps=c.steps.syncnet, **{"config.run.eval_every": 0})
    seconds += _run("audio2motion", ck / "audio2motion" / "metrics.json",
                    "train_audio2motion", data=data / "corpus", workdir=ck / "audio2motion",
                    syncnet=ck / "syncnet", config=stage, steps=c.steps.audio2motion,
                    **{"config.run.eval_every": 0, "config.optim.warmup": 1})
    seconds += _run("postnet", ck / "postnet" / "metrics.json", "train_postnet",
                    data=data / "person", audio2motion=ck / "audio2motion",
                    workdir=ck / "postnet", config=stage, steps=c.steps.postnet)
    seconds += _run("head", ck / "head" / "metrics.json", "train_nerf", part="head",
                    data=data / "person", workdir=ck / "head", config=stage,
                    steps=c.steps.head, **{"config.head.rays": c.rays})
    seconds += _run("torso", ck / "torso" / "metrics.json", "train_nerf", part="torso",
                    head=ck / "head", workdir=ck / "torso", config=stage,
                    steps=c.steps.torso, **{"config.torso.rays": c.rays})
    ref = ck / "reference.npz"
    if not ref.is_file():
        from geneface_jax import pipeline as pl
        from geneface_jax.data import format as fmt
        pl.ReferenceTrack.from_person(fmt.load_person(data / "person")).save(ref)
    return seconds


def measure(root, minutes):
    audio = harness.speech_audio(root / f"speech_{minutes:g}min.wav", minutes)
    out = root / f"video_{minutes:g}min.mp4"
    p = subprocess.run([sys.executable, "-m", "experiments.bench.synthesis_memory",
                        "--child", f"--workdir={root}", f"--audio={audio}", f"--out={out}"],
                       capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"error: synthesis of {audio} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["minutes_audio"] = minutes
    return res


def main(argv):
    del argv
    if FLAGS.child:
        return child()
    from experiments.bench.machine import cpu_name
    root = pathlib.Path(FLAGS.workdir).absolute()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    build_s = build_checkpoints(root)
    runs = []
    for m in sorted(float(x) for x in FLAGS.minutes):
        res = measure(root, m)
        print(f"[bench] {m:g} min of audio: peak RSS {res['peak_mb']} MB "
              f"({res['frames']} frames, {res['render_fps']} fps)", file=sys.stderr, flush=True)
        runs.append(res)
    ratio = runs[-1]["peak_mb"] / runs[0]["peak_mb"]
    print(json.dumps({
        "bench": "synthesis_memory", "checkpoints": "tiny demo (experiments/configs/demo.py)",
        "peak_rss_mb": {f"{r['minutes_audio']:g}min": r["peak_mb"] for r in runs},
        "ratio": round(ratio, 3), "bar": f"< {BAR}", "bar_met": bool(ratio < BAR),
        "runs": runs, "build_seconds": round(build_s, 1),
        "wall_seconds": round(time.time() - t0, 1), "cpu": cpu_name(),
        "cores": os.cpu_count()}))


if __name__ == "__main__":
    app.run(main)
