"""GeneFace checkpoints -> workdirs that this project's loaders read like their own runs.

`import_geneface(ckpt, stage, out)` reads a GeneFace checkpoint (`convert.geneface`),
converts the stage's networks and writes `out` with what the stage's loader reads:

    audio2motion  config.json (stage, model, representation), landmark_std.npy, the
                  checkpoint {step, params, batch_stats}   -> motion.predict.load_audio2motion
    syncnet       config.json (stage, model, representation), the checkpoint {step,
                  params, batch_stats}                       -> train.audio2motion.load_syncnet
    postnet       config.json, landmark_std.npy, identity.npy, the checkpoint {step, ema
                  (GeneFace's generator), discriminator}     -> motion.predict.load_postnet
    head, torso   config.json (stage nerf, part, model, head_model), landmark_norm.npz, the
                  checkpoint {step, params}                  -> render.frames.load_nerf

The checkpoint step is GeneFace's `global_step`; `config.json` records where the weights
came from (`imported`). Nothing is written unless the whole conversion succeeds (the
workdir is built under a temporary name and renamed).

Representation. GeneFace's stage 1, post-net and SyncNet work on `idexp_lm3d`: the
3DMM's identity + expression offsets of the 68 landmarks, x10, not divided by any std
(`data_util/face3d_helper.py`, `reconstruct_idexp_lm3d`). The imported runs keep that
representation as their "motion" and record it (`representation` in config.json); the
conversion to landmarks happens where every consumer already does it,
`landmarks = motion * landmark_std + identity`, with `landmark_std = landmark_unit / 10`
and `identity = 0`: landmarks are GeneFace's idexp_lm3d / 10 (BFM units) times
`landmark_unit` (head units per BFM unit, 1 by default). A post-net trained here on an
imported stage 1 therefore sees stage-1 samples in GeneFace's units and the person's
frames as `(landmarks - their mean) / (landmark_unit / 10)`.

The head NeRF's condition in GeneFace is `(idexp_lm3d - mean) / std` per coordinate with
the person's statistics (`data_gen/nerf/binarizer.py`: `idexp_lm3d_mean`,
`idexp_lm3d_std` in `trainval_dataset.npy`). Here the normaliser is one mean and one
scalar (`render.frames.LandmarkNormalizer`), so the import sets it to mean 0, scale
`landmark_unit / 10` (which turns the landmarks above back into GeneFace's x10 array) and
folds the per-coordinate mean and std into the landmark encoder's first layer (a Dense on
the flattened window frame): `kernel / std` and `bias - (mean / std) @ kernel`, exact up to
float rounding.
"""

import dataclasses
import json
import pathlib
import re

import numpy as np

from geneface_jax import checkpoint as ckpt_lib
from geneface_jax import files
from geneface_jax.convert import geneface as gf
from geneface_jax.errors import CheckpointError, ShapeError

STAGE_NAMES = ("audio2motion", "syncnet", "postnet", "head", "torso")
IDEXP_SCALE = 10.0


def geneface_representation(landmark_unit=1.0):
    """The `representation` record of an imported stage-1 / post-net / SyncNet run."""
    return {"kind": "geneface_idexp_lm3d", "scale": IDEXP_SCALE,
            "landmark_unit": float(landmark_unit), "identity": "included",
            "note": "motion = GeneFace's idexp_lm3d array (identity + expression landmark "
                    "offsets x10); landmarks = motion * landmark_std + identity with "
                    "landmark_std = landmark_unit / scale and identity 0"}


def radnerf_pose(c2w, camera_scale=4.0, camera_offset=(0.0, 0.0, 0.0)):
    """A GeneFace NeRF dataset's camera-to-world pose(s) `[..., 4, 4]` (its `c2w`) -> the
    pose an imported grid head (`lm3d_radnerf`) renders with: RAD-NeRF's world
    (`nerf_matrix_to_ngp`: the axes cycled to (y, z, x), the translation times
    `camera_scale` plus `camera_offset`, GeneFace's hparams) with this project's camera axes
    (x right, y up, looking down -z). float32."""
    p = np.asarray(c2w, np.float64)
    if p.shape[-2:] != (4, 4):
        raise ShapeError(f"radnerf_pose: expected poses [..., 4, 4], got {p.shape}")
    out = np.zeros(p.shape, np.float64)
    out[..., :3, :3] = p[..., [1, 2, 0], :3]
    out[..., :3, 3] = p[..., [1, 2, 0], 3] * camera_scale + np.asarray(camera_offset)
    out[..., 3, 3] = 1.0
    return out.astype(np.float32)


def read_lm3d_stats(path):
    """(mean, std) `[68, 3]` of a person's idexp_lm3d, from GeneFace's
    `trainval_dataset.npy` (read without running pickled code) or an `.npz` with
    `idexp_lm3d_mean` / `idexp_lm3d_std` (or `mean` / `std`)."""
    from geneface_jax.convert.torch_pickle import load_pickled_numpy
    path = pathlib.Path(path)
    if path.suffix == ".npz":
        try:
            z = dict(np.load(path))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable .npz ({e})") from e
    else:
        z = load_pickled_numpy(path)
        if not isinstance(z, dict):
            raise CheckpointError(f"{path}: holds a {type(z).__name__}, not GeneFace's dict "
                                  "of arrays")
    for mean_key, std_key in (("idexp_lm3d_mean", "idexp_lm3d_std"), ("mean", "std")):
        if mean_key in z and std_key in z:
            mean = np.asarray(z[mean_key], np.float64).reshape(-1)
            std = np.asarray(z[std_key], np.float64).reshape(-1)
            break
    else:
        raise CheckpointError(f"{path}: no idexp_lm3d_mean / idexp_lm3d_std entries "
                              f"(found {sorted(z)[:12]})")
    if mean.shape != (204,) or std.shape != (204,):
        raise ShapeError(f"{path}: idexp_lm3d mean / std must hold 68 x 3 values, got "
                         f"{mean.shape} and {std.shape}")
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
        raise CheckpointError(f"{path}: idexp_lm3d std must be positive and finite")
    return mean.reshape(68, 3), std.reshape(68, 3)


def fold_landmark_stats(params, mean, std):
    """Head params whose landmark encoder takes `n` where GeneFace's took
    `(n - mean) / std` (`mean`, `std` `[68, 3]`): the first layer's kernel rows are
    divided by std and its bias absorbs the mean (float64, then float32)."""
    layer = params["landmark_encoder"]["encoder_conv_0"]
    kernel = np.asarray(layer["kernel"], np.float64)
    bias = np.asarray(layer["bias"], np.float64)
    s, m = np.asarray(std, np.float64).reshape(-1), np.asarray(mean, np.float64).reshape(-1)
    if kernel.shape[0] != s.size:
        raise ShapeError(f"landmark encoder takes {kernel.shape[0]} inputs, the statistics "
                         f"hold {s.size}")
    new_kernel = kernel / s[:, None]
    new_bias = bias - (m / s) @ kernel
    out = dict(params)
    out["landmark_encoder"] = dict(params["landmark_encoder"])
    out["landmark_encoder"]["encoder_conv_0"] = {"kernel": new_kernel.astype(np.float32),
                                                 "bias": new_bias.astype(np.float32)}
    return out


# --------------------------------------------------------------------------- conversion

@dataclasses.dataclass
class Converted:
    """A stage's converted variables, its config and where they came from."""
    stage: str
    config: object
    variables: dict
    checkpoint: gf.GenefaceCheckpoint
    roots: tuple
    keys: int
    unused: dict


def _unused_summary(stage, sd, used):
    counts = {}
    for key in sd:
        if key in used:
            continue
        for pattern, _ in stage.unused:
            if re.search(pattern, key):
                counts[pattern] = counts.get(pattern, 0) + 1
                break
    return counts


def convert_stage(ckpt, stage_name, *, step=None, head_config=None):
    """Reads `ckpt` (file or GeneFace work dir) and converts `stage_name`'s networks.
    The torso needs `head_config` (the head run's NeRFConfig)."""
    if stage_name not in gf.STAGES:
        raise ValueError(f"stage must be one of {sorted(gf.STAGES)}, got {stage_name!r}")
    ck = ckpt if isinstance(ckpt, gf.GenefaceCheckpoint) else gf.read_checkpoint(ckpt, step)
    sd = ck.state_dict
    # the head and torso of GeneFace's grid renderer (lm3d_radnerf) are found by their keys
    grid = {"head": gf.GRID_HEAD, "torso": gf.GRID_TORSO}.get(stage_name)
    if grid is not None and any(r[0] + grid.probe in sd for r in grid.prefixes):
        stage_name = grid.name
    stage = gf.STAGES[stage_name]
    roots = gf.locate(stage, sd)
    where = f"{ck.path}"
    if stage_name in ("torso", "grid_torso"):
        if head_config is None:
            raise CheckpointError("torso: the import needs the head run (its landmark "
                                  "encoder feeds the torso); pass the imported head workdir")
        from geneface_jax.render.frames import is_grid
        if is_grid(head_config) != (stage_name == "grid_torso"):
            raise CheckpointError(f"{where}: a {'grid' if stage_name == 'grid_torso' else 'MLP'}"
                                  f" torso needs a head of the same renderer; the given head "
                                  f"is {'grid' if is_grid(head_config) else 'MLP'}")
        make = gf.grid_torso_config if stage_name == "grid_torso" else gf.torso_config
        config = make(sd, roots[0], ck.hparams, head_config)
    else:
        config = stage.config_from(sd, roots if stage_name == "postnet" else roots[0],
                                   ck.hparams)
    expected = gf.entries(stage, config, roots)
    variables = gf.convert(stage, sd, config, roots, where=where, expected=expected)
    used = {e.key for e in expected}
    return Converted(stage=stage_name, config=config, variables=variables, checkpoint=ck,
                     roots=roots, keys=len(used), unused=_unused_summary(stage, sd, used))


# --------------------------------------------------------------------------- workdirs

def _imported_record(conv: Converted, **extra):
    ck = conv.checkpoint
    return dict({"from": "GeneFace", "checkpoint": str(pathlib.Path(ck.path).absolute()),
                 "global_step": ck.step, "epoch": ck.epoch, "networks": list(conv.roots),
                 "converted_keys": conv.keys, "unused_keys": conv.unused,
                 "hparams": "config.yaml" if ck.hparams else "GeneFace's defaults"}, **extra)


def _save_checkpoint(workdir, step, state):
    ck = ckpt_lib.Checkpointer(pathlib.Path(workdir) / "checkpoints", max_to_keep=1)
    try:
        ck.save(int(step), state, force=True)
    finally:
        ck.close()


def _json(path, obj):
    text = json.dumps(obj, indent=1, sort_keys=True, default=_to_json) + "\n"
    files.write_bytes_atomic(path, text.encode())


def _to_json(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (tuple, np.ndarray)):
        return list(np.asarray(value).tolist())
    raise TypeError(f"not JSON-able: {type(value).__name__}")


def _save_npy(path, array):
    with files.atomic_path(path, ".npy") as tmp:
        np.save(tmp, np.asarray(array, np.float32))


def _check_out(out, overwrite):
    out = pathlib.Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out}: exists and is not empty; choose another --out (or "
                              "overwrite it)")
    return out


def import_geneface(ckpt, stage, out, *, step=None, lm3d_stats=None, head=None,
                    landmark_unit=1.0, overwrite=False):
    """Converts `stage` of a GeneFace checkpoint and writes the workdir `out` (see the
    module doc). Returns a summary dict (stage, out, step, keys, config, unused).

    Args:
      ckpt: a GeneFace checkpoint file or work dir (newest step, or `step`).
      stage: 'audio2motion', 'syncnet', 'postnet', 'head' or 'torso'.
      lm3d_stats: head only: the person's idexp_lm3d statistics (`read_lm3d_stats`:
        GeneFace's trainval_dataset.npy or an .npz); required.
      head: torso only: the workdir of the imported head (its config and normaliser).
      landmark_unit: head-space units per BFM unit (see the module doc).
    """
    from geneface_jax.render import frames
    if stage not in STAGE_NAMES:
        raise ValueError(f"stage must be one of {STAGE_NAMES}, got {stage!r}")
    if not landmark_unit > 0:
        raise ValueError(f"landmark_unit must be positive, got {landmark_unit}")
    out = _check_out(out, overwrite)
    head_run = head_cfg = normalizer = None
    if stage == "torso":
        if head is None:
            raise CheckpointError("--stage=torso needs --head=WORKDIR (the imported head)")
        head_cfg, _, head_run, normalizer = frames.load_nerf(head, frames.HEAD)
    if stage == "head" and lm3d_stats is None:
        raise CheckpointError("--stage=head needs --lm3d_stats: GeneFace normalises the "
                              "head's landmarks with the person's idexp_lm3d mean and std "
                              "(data/binary/videos/<id>/trainval_dataset.npy, or an .npz "
                              "with idexp_lm3d_mean / idexp_lm3d_std)")
    conv = convert_stage(ckpt, stage, step=step, head_config=head_cfg)
    ck = conv.checkpoint
    rep = geneface_representation(landmark_unit)
    std = np.full((68, 3), landmark_unit / IDEXP_SCALE, np.float32)
    cfg = dataclasses.asdict(conv.config)
    with files.atomic_dir(out) as tmp:
        if stage == "audio2motion":
            if conv.config.motion_dim != 204:
                raise ShapeError(f"{ck.path}: stage 1 predicts {conv.config.motion_dim}-d "
                                 "motion; only 68 x 3 landmarks (204) are supported")
            run = dict(stage="audio2motion", model_type="vae", model=cfg, data=None,
                       syncnet=None, syncnet_model=None, representation=rep,
                       imported=_imported_record(conv))
            _save_npy(tmp / "landmark_std.npy", std)
            _save_checkpoint(tmp, ck.step, dict(step=np.int32(ck.step), **conv.variables))
        elif stage == "syncnet":
            run = dict(stage="syncnet", model=cfg, data=None, representation=rep,
                       imported=_imported_record(conv))
            _save_checkpoint(tmp, ck.step, dict(step=np.int32(ck.step), **conv.variables))
        elif stage == "postnet":
            run = dict(stage="postnet", model=cfg, data=None, corpus=None,
                       audio2motion=None, syncnet=None, representation=rep,
                       imported=_imported_record(
                           conv, generator="GeneFace's generator as trained (no EMA): "
                                           "stored as the run's EMA"))
            _save_npy(tmp / "landmark_std.npy", std)
            _save_npy(tmp / "identity.npy", np.zeros((68, 3), np.float32))
            _save_checkpoint(tmp, ck.step, dict(step=np.int32(ck.step),
                                                ema=conv.variables["generator"],
                                                discriminator=conv.variables["discriminator"]))
        elif stage == "head":
            mean, sd = read_lm3d_stats(lm3d_stats)
            params = fold_landmark_stats(conv.variables["params"], mean, sd)
            grid = conv.stage == "grid_head"
            run = dict(stage="nerf", part="head", renderer="grid" if grid else "mlp",
                       model=cfg, bounds="config",
                       data=None, head=None, head_model=None, representation=rep,
                       imported=_imported_record(conv, lm3d_stats=str(
                           pathlib.Path(lm3d_stats).absolute()), folded="idexp_lm3d mean / "
                           "std into params/landmark_encoder/encoder_conv_0"))
            frames.LandmarkNormalizer(mean=np.zeros((68, 3), np.float32),
                                      scale=landmark_unit / IDEXP_SCALE).save(
                tmp / "landmark_norm.npz")
            state = dict(step=np.int32(ck.step), params=params)
            if grid:            # the occupancy grid, where training runs keep it
                state["batch_stats"] = conv.variables["occupancy"]
            _save_checkpoint(tmp, ck.step, state)
        else:
            head_abs = str(pathlib.Path(head).absolute())
            grid = conv.stage == "grid_torso"
            run = dict(stage="nerf", part="torso", renderer="grid" if grid else "mlp",
                       model=cfg,
                       bounds="config", data=head_run.get("data"), head=head_abs,
                       head_model=head_run["model"],
                       representation=head_run.get("representation", rep),
                       imported=_imported_record(conv, **({} if grid else dict(condition=(
                           "GeneFace's torso was trained on a DeepSpeech audio feature "
                           "(aud_net/audatt_net, not converted); here its 64 condition "
                           "channels take the head's landmark feature")))))
            normalizer.save(tmp / "landmark_norm.npz")
            _save_checkpoint(tmp, ck.step, dict(step=np.int32(ck.step),
                                                params=conv.variables["params"]))
        _json(tmp / "config.json", run)
        summary = dict(stage=stage, out=str(out), step=ck.step, checkpoint=str(ck.path),
                       converted_keys=conv.keys, unused_keys=conv.unused, model=cfg)
        _json(tmp / "metrics.json", dict(imported=summary))
    return summary
