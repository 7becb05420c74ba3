r"""Is the H.264 writer reproducible, and how fast is it? (`data.video.x264_simd_flags`)

  python -m experiments.bench.video_encoding [--runs=30] [--sizes=32,48,64,128]

Encodes the same 30-frame clip (smooth colour ramps plus fixed noise, so rate control has
work) `--runs` times at each size with `data.video.write_video`, as synthesis does, and
counts the distinct decoded results: 1 is reproducible. Then times a 100-frame 512x512
encode (preset medium, crf 18). Each figure is printed for the writer as it is (`x264's
SIMD: ...`, AVX-512 left out on a CPU that has it) and for libx264's own choice (`auto`).
Last line: one JSON object.
"""

import json
import time

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("runs", 30, "Encodes per size.")
flags.DEFINE_list("sizes", ["32", "48", "64", "128"], "Square frame sizes (pixels).")


def clip(size, n=30, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] / size
    frames = np.stack([np.stack([np.sin(6 * x + 0.3 * t) * 0.5 + 0.5,
                                 np.cos(5 * y - 0.2 * t) * 0.5 + 0.5,
                                 (x * y + 0.01 * t) % 1], -1) for t in range(n)])
    return np.clip(frames * 255 + rng.integers(0, 20, frames.shape), 0, 255).astype(np.uint8)


def main(argv):
    del argv
    import hashlib
    import tempfile

    from geneface_jax.data import video
    original = video.x264_simd_flags
    own = original()
    auto = lambda: None  # noqa: E731 - libx264 detects the CPU itself
    out = {"bench": "video_encoding", "simd": list(own) if own else "auto"}
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/clip.mp4"
        for name, flags_fn in (("writer", original), ("auto", auto)):
            if name == "auto" and own is None:
                continue            # the writer already leaves the choice to libx264
            video.x264_simd_flags = flags_fn
            try:
                for size in map(int, FLAGS.sizes):
                    frames = clip(size)
                    seen = set()
                    for _ in range(FLAGS.runs):
                        video.write_video(path, frames)
                        seen.add(hashlib.sha256(b"".join(
                            f.tobytes() for f in video.read_video(path))).hexdigest())
                    out[f"{name}_distinct_{size}"] = len(seen)
                    print(f"{name}: {size}x{size}: {len(seen)} distinct of {FLAGS.runs}",
                          flush=True)
                big = clip(512, n=100)
                t = time.perf_counter()
                video.write_video(path, big)
                fps = 100 / (time.perf_counter() - t)
                out[f"{name}_fps_512"] = round(fps, 1)
                print(f"{name}: 512x512 encode {fps:.1f} frames/s", flush=True)
            finally:
                video.x264_simd_flags = original
    print(json.dumps(out))


if __name__ == "__main__":
    app.run(main)
