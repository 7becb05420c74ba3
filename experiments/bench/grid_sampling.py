r"""Where the grid head's samples go: the occupancy grid against stratified sampling.

  python -m experiments.bench.grid_sampling --head=RUN [--frames=8]

On `frames` evenly spaced held-out frames of a trained grid head run, whole-frame rays:
the share of pixels whose ray meets an occupied cell (the only rays a frame traces), the
share of the MLP NeRF's stratified samples (`--stratified` per ray between the run's
near and far) that land in occupied cells (the rest are spent on empty space), the share
of the occupancy sampler's K samples that do (all of them on rays that meet the head, by
construction), and the time of the occupancy pass per ray against one field evaluation
per sample. Last line: JSON.
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from geneface_jax.data import format as fmt
from geneface_jax.render import frames as rf
from geneface_jax.render import grid_fields as gf
from geneface_jax.render import rays as rays_lib
from geneface_jax.train import nerf as tn

flags.DEFINE_string("head", None, "A grid head run (train_nerf --part=head).")
flags.DEFINE_integer("frames", 8, "Held-out frames to look at.")
flags.DEFINE_integer("stratified", 48, "Stratified samples per ray to compare with.")
FLAGS = flags.FLAGS


def _time(fn, *args, n=5):
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(n):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / n


def main(argv):
    del argv
    cfg, variables, run, norm = rf.load_nerf(FLAGS.head, "head")
    if not rf.is_grid(cfg):
        raise SystemExit(f"error: {FLAGS.head} is not a grid head run")
    views = tn.PersonViews(fmt.load_person(run["data"]), norm)
    lo, hi = views.split_range("valid" if "valid" in views.splits else "train")
    ts = np.unique(np.linspace(lo, hi - 1, FLAGS.frames).round().astype(int))
    bits = jnp.asarray(variables["occupancy"]["bits"])
    k = rf._ray_intrinsics(views.intrinsics, cfg, (views.height, views.width))
    o, d = rays_lib.pixel_rays(jnp.asarray(views.poses[ts]), k, views.height, views.width)
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    hit = np.asarray(jax.jit(lambda a, b: gf.rays_hit(a, b, bits, cfg))(o, d))
    # stratified samples (bin midpoints) between near and far, as the MLP NeRF draws them
    s = FLAGS.stratified
    t = cfg.near + (jnp.arange(s) + 0.5) / s * (cfg.far - cfg.near)
    pts = o[:, None] + d[:, None] * t[None, :, None]
    strat_occ = np.asarray(jnp.take(bits.reshape(-1), gf.cell_index(pts, cfg)))
    t_k, _, inside = jax.jit(lambda a, b: gf.occupancy_samples(a, b, bits, cfg))(o, d)
    inside = np.asarray(inside)
    # cost: the occupancy pass per ray vs the field per sample
    r = 4096
    occ_s = _time(jax.jit(lambda a, b: gf.bin_occupancy(a, b, bits, cfg)[2]), o[:r], d[:r])
    model = gf.GridHeadNeRF(cfg)
    p = jnp.asarray(o[:r, None] + d[:r, None] * t_k[:r, :, None]).reshape(-1, 3)
    view = d[:r] / jnp.linalg.norm(d[:r], axis=-1, keepdims=True)
    field = jax.jit(lambda q, v: model.apply(variables, q, v, jnp.zeros((r, cfg.cond_dim)),
                                             jnp.zeros((r, cfg.code_dim)),
                                             group=cfg.num_samples,
                                             method=gf.GridHeadNeRF.field)[0])
    field_s = _time(field, p, view)
    out = dict(frames=int(len(ts)), pixels=int(len(hit)), hit_share=float(hit.mean()),
               occupied_cells=float(np.asarray(bits).mean()),
               stratified_samples=s, stratified_occupied_share=float(strat_occ.mean()),
               stratified_occupied_share_on_hit_rays=float(strat_occ[hit].mean()),
               grid_samples=cfg.num_samples,
               grid_occupied_share_on_hit_rays=float(inside[hit].mean()),
               occupancy_pass_us_per_ray=occ_s / r * 1e6,
               field_us_per_sample=field_s / (r * cfg.num_samples) * 1e6,
               occupancy_bins=cfg.num_bins)
    print(json.dumps(out))


if __name__ == "__main__":
    flags.mark_flag_as_required("head")
    app.run(main)
