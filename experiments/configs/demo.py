"""The embedded demo's sizes: `python -m experiments.demo [--config=cpu|quick|tiny]`.

cpu (default): a 128x128 person of 250 frames and a corpus of 200 utterances by 20
  speakers; every stage trained with its `cpu` preset for a few hundred steps (SyncNet
  800, stage 1 1000, post-net 1000, the grid head 1500 steps of 2048 rays with a quarter
  of them in the mouth box, the grid torso 300); every held-out frame evaluated.
quick: a 64-pixel person and smaller step counts (notebooks, a first look; not a good video).
tiny: the test suite's end-to-end run: a 32-pixel person, every stage's `tiny` preset and
  a handful of steps.
`nerf_model`: the renderer, `grid` (experiments/configs/grid.py) or `mlp` (nerf.py, the
  paper's MLP NeRF; the earlier demo: `--config.nerf_model=mlp --config.person.size=96
  --config.steps.head=700 --config.steps.torso=120 --config.rays=1024`).
Single values: `--config.steps.head=1000`, `--config.person.size=96`.
"""

import ml_collections

PRESETS = ("cpu", "quick", "tiny")


def get_config(preset="cpu"):
    preset = preset or "cpu"
    if preset not in PRESETS:
        raise ValueError(f"demo: unknown preset {preset!r} (expected one of {PRESETS})")
    c = ml_collections.ConfigDict()
    c.person = dict(size=128, frames=250)
    c.corpus = dict(utterances=200, speakers=20)
    c.stage_preset = "cpu"              # the preset of every stage's config file
    c.nerf_model = "grid"               # grid | mlp
    c.steps = dict(syncnet=800, audio2motion=1000, postnet=1000, head=1500, torso=300)
    c.rays = 2048                       # NeRF rays per training step
    c.mouth_percent = 0.25              # share of the head's rays in the mouth box
    c.eye_percent = 0.2                 # ... in the eye box (docs/stage3_nerf.md, "Eyes")
    c.blink_frame_percent = 0.3         # share of head frames drawn among closing-eye ones
    c.eval_frames = 0                   # held-out frames scored by eval_nerf (0: all)
    if preset == "quick":
        c.person.update(size=64, frames=100)
        c.corpus.update(utterances=48, speakers=8)
        c.steps.update(syncnet=150, audio2motion=300, postnet=200, head=400, torso=80)
        c.rays = 1024
    if preset == "tiny":
        c.person.update(size=32, frames=30)
        c.corpus.update(utterances=12, speakers=4)
        c.stage_preset = "tiny"
        c.steps.update(syncnet=10, audio2motion=8, postnet=10, head=10, torso=4)
        c.rays = 128
        c.eval_frames = 1
    return c
