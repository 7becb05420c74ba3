r"""Stage 3's rendering speed on a trained person, pass by pass in one process.

  python -m experiments.bench.render_speed --checkpoints=demo_out/checkpoints
      [--audio=WAV (default: the packaged en_us_male clip)] [--passes=2]
      [--head_samples=0] [--max_frames=0]

Loads the pipeline as `experiments.synthesize` does (the same process settings: the
host's cores split into XLA devices, the compile cache), computes the clip's landmarks
once (features, stages 1 and 2), then renders every frame `--passes` times through
`TalkingFacePipeline.render_frames` (the frames `synthesize` writes, without the video
encoding). For each pass:

  fps              frames / the pass's wall seconds
  seconds          the pass's wall time
  program_seconds  time inside the renderer's ray programs (`render.sharded.render_image`
                   calls: padding, the compiled head + torso and torso programs, the copy
                   back), the rest being the per-call host work (conditions, per-frame hit
                   masks, rays, assembling the frames) and, in the first pass, loading or
                   compiling those programs
  calls            `render_image` calls, with `rays` (per frame) traced through them

With `--profile`, the last pass's largest call (the head + torso program) is run again
3 times under the JAX profiler: its ops' milliseconds per call, summed over the devices,
by kind (matmul, gather, ...) and by source scope (`SCOPES`; `experiments.bench.
xla_trace`), in the JSON line's `profile`.

The first pass pays for loading the compiled programs from the cache (or compiling them:
`GENEFACE_XLA_CACHE=off`); later passes are the steady rate a long clip approaches.
`passes_equal` checks that every pass rendered the same frames (bitwise). The last line
printed is one JSON object.
"""

import json
import time

from absl import app
from absl import flags

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoints", None, "A trained person's checkpoints (experiments.demo "
                                         "writes them to demo_out/checkpoints).")
flags.DEFINE_string("audio", None, "Speech to render (default: the packaged en_us_male "
                                   "clip).")
flags.DEFINE_integer("passes", 2, "Times every frame is rendered.")
flags.DEFINE_integer("head_samples", 0, "Samples per grid-head ray (0: as trained).")
flags.DEFINE_integer("max_frames", 0, "Render only the clip's first N frames (0: all).")
flags.DEFINE_bool("profile", False, "Also profile the head + torso program on the last "
                  "pass's largest call: its XLA ops by kind and by source scope.")

# where the render program's ops come from (`xla_trace` scopes: substrings of op_name)
SCOPES = [("grid_encoding", ("/grid/", "/ambient_grid/")), ("ambient_net", ("ambient_net",)),
          ("sigma_net", ("sigma_net",)), ("color_net", ("color_net",)),
          ("torso", ("GridTorso",)), ("head_render", ("GridHeadNeRF.render",))]


def main(argv):
    del argv
    common.require("checkpoints")
    if FLAGS.passes < 1:
        raise app.UsageError(f"--passes must be >= 1, got {FLAGS.passes}")
    import jax
    import numpy as np
    from geneface_jax import pipeline as pl
    from geneface_jax.audio import features as feat
    from geneface_jax.audio import io as audio_io
    from geneface_jax.data.synthetic import speech
    from geneface_jax.render import sharded

    pipe = pl.TalkingFacePipeline.load(FLAGS.checkpoints)
    audio = FLAGS.audio or str(speech.default_clip())
    _, wav, n = pl.clip_frames(audio_io.load_audio(audio), FLAGS.max_frames, audio)
    options = pl.SynthesisOptions(head_samples=FLAGS.head_samples)
    track, poses = pipe.plan(n, options)
    res = pipe.landmarks(pipe.features(wav), feat.frame_energy(wav), options=options,
                         track=track)

    calls = []
    real = sharded.render_image

    def timed(fn, rays, **kw):
        t = time.perf_counter()
        out = real(fn, rays, **kw)
        calls.append((sharded.num_rays_of(rays), time.perf_counter() - t, (fn, rays, kw)))
        return out

    passes, first = [], None
    sharded.render_image = timed
    try:
        for i in range(FLAGS.passes):
            calls.clear()
            t = time.perf_counter()
            frames = np.concatenate(list(pipe.render_frames(res["landmarks"], track,
                                                            options=options, poses=poses)))
            wall = time.perf_counter() - t
            same = True if first is None else bool(np.array_equal(frames, first))
            first = frames if first is None else first
            passes.append({"fps": round(n / wall, 2), "seconds": round(wall, 2),
                           "program_seconds": round(sum(s for _, s, _ in calls), 2),
                           "calls": len(calls),
                           "rays_per_frame": round(sum(r for r, _, _ in calls) / n, 1),
                           "equal_to_first": same})
            print(f"pass {i + 1}/{FLAGS.passes}: {passes[-1]}", flush=True)
    finally:
        sharded.render_image = real
    profile = "not profiled (--noprofile)"
    if FLAGS.profile:
        profile = _profile(max(calls, key=lambda c: c[0])[2], sharded)
    print(json.dumps({
        "frames": n, "size": [pipe.reference.height, pipe.reference.width],
        "head_samples": FLAGS.head_samples, "passes": passes,
        "passes_equal": all(p["equal_to_first"] for p in passes),
        "devices": len(jax.devices()), "platform": jax.devices()[0].platform,
        "checkpoints": FLAGS.checkpoints, "audio": audio, "profile": profile}), flush=True)


def _profile(call, sharded):
    """`xla_trace.thunk_breakdown` of one renderer call (fn, rays, render_image kwargs):
    the compiled program run 3 times on its padded rays."""
    import jax
    from experiments.bench import xla_trace
    fn, rays, kw = call
    r = sharded.num_rays_of(rays)
    _, total = sharded.padded_layout(r, kw["mesh"].shape["data"], kw["chunk"])
    padded = jax.tree.map(lambda x: sharded._pad_rows(x, total), rays)
    program = sharded._compiled(fn, kw["mesh"], kw["chunk"])
    hlo = program.lower(kw["params"], padded).compile().as_text()
    out = xla_trace.thunk_breakdown(
        lambda: jax.block_until_ready(program(kw["params"], padded)), 3, hlo_text=hlo,
        top=10, scopes=SCOPES)
    return {"rays": r, "function": fn.__qualname__.split(".")[0], **out}


if __name__ == "__main__":
    common.run(main)
