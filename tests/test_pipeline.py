"""The end-to-end pipeline's parts that need no trained model: reference tracks, the
silence gate, region rendering, scoring."""

import dataclasses

import jax
import numpy as np
import pytest

from geneface_jax import pipeline as pl
from geneface_jax import train
from geneface_jax.data import format as fmt
from geneface_jax.data import landmarks as lm
from geneface_jax.data.synthetic import world
from geneface_jax.errors import CheckpointError, InputError, ShapeError
from geneface_jax.render import fields
from geneface_jax.render import frames as rf
from geneface_jax.train import nerf as tn

from experiments.configs import nerf as nerf_presets

from conftest import perturbed

# the tiny preset's sizes (experiments/configs/nerf.py), the synthetic person's bounds
TINY = fields.NeRFConfig(**dict(nerf_presets.get_config("tiny").model, near=0.4, far=0.8,
                                smooth_warmup_steps=1000))


@pytest.fixture(scope="module")
def person(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "person"
    arrays, meta, wav = world.make_person(2, size=32, num_frames=30, progress=False)
    fmt.write_person(out, arrays, meta, wav)
    return fmt.load_person(out)


def test_track_indices_loop_and_mirror():
    np.testing.assert_array_equal(pl.track_indices(7, 3, "loop"), [0, 1, 2, 0, 1, 2, 0])
    np.testing.assert_array_equal(pl.track_indices(9, 3, "mirror"),
                                  [0, 1, 2, 1, 0, 1, 2, 1, 0])
    # Mirror never jumps: consecutive reference frames are neighbours.
    idx = pl.track_indices(500, 37, "mirror")
    assert np.abs(np.diff(idx)).max() == 1 and idx.min() == 0 and idx.max() == 36
    np.testing.assert_array_equal(pl.track_indices(4, 1, "mirror"), [0, 0, 0, 0])
    with pytest.raises(InputError):
        pl.track_indices(4, 3, "bounce")
    with pytest.raises(InputError):
        pl.SynthesisOptions(pose_mode="bounce")


def test_silence_weights_close_only_whole_silent_windows():
    loud, quiet = 0.1, 1e-5            # -20 dBFS speech, -100 dBFS silence
    per_frame = np.array([loud] * 10 + [quiet] * 12 + [loud] * 3 + [quiet] * 2 + [loud] * 5)
    energy = np.repeat(per_frame, 2)
    w = pl.silence_weights(energy, silence_db=-50.0, window=5, fade=1)
    expect = np.zeros(len(per_frame))
    expect[12:20] = 1.0                # silent frames with >= 2 silent frames each side
    np.testing.assert_array_equal(w, expect)
    # A 2-frame pause inside speech does not close the mouth.
    assert w[25:27].max() == 0.0
    faded = pl.silence_weights(energy, silence_db=-50.0)
    assert 0.0 < faded[12] < 1.0 and faded[15] == 1.0
    assert pl.silence_weights(np.zeros(40)).min() == 1.0          # digital silence
    with pytest.raises(ShapeError):
        pl.silence_weights(np.zeros(5))


def test_reference_track_from_person_and_round_trip(person, tmp_path):
    ref = pl.ReferenceTrack.from_person(person)
    lo, hi = person.meta["splits"]["train"]
    assert len(ref) == hi - lo
    np.testing.assert_array_equal(ref.poses, person["poses"][lo:hi])
    np.testing.assert_array_equal(ref.torso_pose, person["poses"][lo])
    # The render region holds every pixel the person covers in any frame.
    covered = (np.asarray(person["masks"]) > 0).any(0)
    assert ref.render_mask[covered].all()
    assert ref.render_mask.sum() < ref.render_mask.size          # and not the whole image
    opening = lm.mouth_opening(person["landmarks"][lo:hi])
    np.testing.assert_allclose(lm.mouth_opening(
        np.concatenate([np.zeros((48, 3)), ref.rest_mouth])[None]), opening.min(), atol=1e-7)
    path = ref.save(tmp_path / "reference.npz")
    back = pl.ReferenceTrack.load(path)
    for f in dataclasses.fields(ref):
        np.testing.assert_array_equal(getattr(back, f.name), getattr(ref, f.name))
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(CheckpointError):
        pl.ReferenceTrack.load(tmp_path / "bad.npz")


def test_dilate_matches_brute_force():
    rng = np.random.default_rng(0)
    mask = rng.uniform(size=(17, 23)) > 0.93
    out = pl._dilate(mask, 2)
    ys, xs = np.nonzero(mask)
    expect = np.zeros_like(mask)
    for y, x in zip(ys, xs):
        expect[max(y - 2, 0):y + 3, max(x - 2, 0):x + 3] = True
    np.testing.assert_array_equal(out, expect)


def test_region_render_equals_full_render_inside_and_background_outside(person):
    """FrameRenderer(pixels=...) traces the same rays as the full frame: identical colours
    inside the region, the static background (and zero opacity) outside."""
    views = tn.PersonViews(person)
    _, head_state = tn.create_nerf_state(TINY, tn.NeRFOptimConfig(), rf.HEAD, 3)
    _, torso_state = tn.create_nerf_state(TINY, tn.NeRFOptimConfig(), rf.TORSO, 4,
                                          {"params": head_state.params})
    # Non-trivial weights: the torso's output layers start near zero.
    torso_params = perturbed(torso_state.params, 1, 0.3)
    mesh = train.make_mesh(jax.devices()[:2])
    r = rf.FrameRenderer(TINY, {"params": head_state.params}, views, torso_cfg=TINY,
                         torso_vars={"params": torso_params}, chunk=97, smooth=False,
                         mesh=mesh)
    win = views.windows([3], TINY.smooth_window)[0]
    full = r.render(views.poses[3], win, views.torso_pose())
    region = pl.ReferenceTrack.from_person(person).render_mask
    pixels = np.flatnonzero(region)
    part = r.render(views.poses[3], win, views.torso_pose(), pixels=pixels)
    for k in ("rgb", "head_rgb", "head_acc", "torso_acc"):
        np.testing.assert_allclose(part[k][region], full[k][region], atol=2e-5)
    np.testing.assert_array_equal(part["rgb"][~region], views.background[~region])
    assert part["head_acc"][~region].max() == 0.0
    with pytest.raises(ShapeError):
        r.render(views.poses[3], win, views.torso_pose(), pixels=np.array([-1]))

    # Regions: pixels in both regions are the full render; pixels only in the head
    # region are the head over the background (the torso taken as empty); pixels only
    # in the torso region have an empty head; the rest is the background.
    ref = pl.ReferenceTrack.from_person(person)
    hr, tr = ref.head_region, ref.torso_region
    assert (hr & tr).any() and (hr & ~tr).any() and (tr & ~hr).any()
    split = r.render(views.poses[3], win, views.torso_pose(), regions=(hr, tr))
    for k in ("rgb", "head_rgb", "head_acc", "torso_acc"):
        np.testing.assert_allclose(split[k][hr & tr], full[k][hr & tr], atol=2e-5)
    head_only = rf.FrameRenderer(TINY, {"params": head_state.params}, views, chunk=97,
                                 smooth=False, mesh=mesh).render(views.poses[3], win)
    np.testing.assert_allclose(split["rgb"][hr & ~tr], head_only["rgb"][hr & ~tr], atol=2e-5)
    assert split["torso_acc"][hr & ~tr].max() == 0.0
    assert split["head_acc"][tr & ~hr].max() == 0.0
    # Where the full render's head is empty too, the torso-only path is the full render.
    empty = tr & ~hr & (full["head_acc"] < 1e-7)
    assert empty.sum() > 10
    for k in ("rgb", "torso_acc"):
        np.testing.assert_allclose(split[k][empty], full[k][empty], atol=2e-5)
    out = ~(hr | tr)
    np.testing.assert_array_equal(split["rgb"][out], views.background[out])


def test_scores_and_mouth_activity():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(50, 68, 3))
    s = pl.landmark_scores(truth, truth)
    assert s["lmd"] == 0.0 and s["lmd_mouth"] == 0.0 and s["sync_corr"] == pytest.approx(1.0)
    shifted = truth + np.array([0.0, 0.0, 0.5])
    assert pl.landmark_scores(shifted, truth)["lmd"] == pytest.approx(0.5)
    # Mouth activity: darker mouth boxes score higher, in proportion.
    frames = np.full((4, 8, 8, 3), 200, np.uint8)
    frames[1, 2:4, 2:4] = 0
    frames[2, 2:4, 2:4] = 100
    act = pl.mouth_pixel_activity(frames, np.array([[2, 2, 4, 4]] * 4))
    assert act[1] > act[2] > act[0] == act[3]
    assert act[1] - act[0] == pytest.approx(2 * (act[2] - act[0]))
    db = pl.frame_energy_db(np.array([1.0, 1.0, 0.0, 0.0]))
    np.testing.assert_allclose(db, [0.0, -60.0], atol=1e-6)
    assert pl.pearson([1, 2, 3], [2, 4, 7]) > 0.98


def test_mouth_boxes_keep_one_size_and_weigh_border_pixels_by_coverage():
    """The lip heuristic's boxes: one size for the whole video, centred on each frame's
    lips, kept inside the image; a box edge inside a pixel weighs it by its share. On a
    mouth whose dark cavity grows with the opening, the darkening in boxes of one size is
    exactly linear in the cavity's area, in per-frame boxes (which grow with the lips)
    it is not."""
    grey = np.zeros((1, 2, 4, 3), np.uint8)
    grey[0, :, :] = np.array([0, 100, 200, 50], np.uint8)[None, :, None]
    two = np.concatenate([grey, np.full_like(grey, 0)])
    act = pl.mouth_pixel_activity(two, np.array([[1.5, 0.0, 3.5, 2.0]] * 2))
    assert act[0] - act[1] == pytest.approx(-(0.5 * 100 + 200 + 0.5 * 50) / 2 / 255,
                                            rel=1e-12)
    # Lips drawn at camera depth 1 (identity pose), 1 px = 0.01 units (f = 100, centre 32).
    n, f, c = 9, 100.0, 32.0
    intr = np.array([f, f, c, c])
    poses = np.tile(np.eye(4), (n, 1, 1))
    opening = np.linspace(2.0, 10.0, n)                  # pixels the lower lip drops
    landmarks = np.zeros((n, 68, 3))
    landmarks[:, :, 2] = -1.0
    xs = np.linspace(-0.1, 0.1, len(lm.OUTER_LIP))       # lips 20 px wide
    landmarks[:, lm.OUTER_LIP, 0] = xs
    landmarks[:, lm.OUTER_LIP, 1] = 0.02                 # top lip 2 px above centre ...
    landmarks[:, lm.OUTER_LIP[::2], 1] = -opening[:, None] / f     # ... lower lip below
    frame_boxes = pl.mouth_boxes(landmarks, poses, intr, 64, 64, size="frame")
    boxes = pl.mouth_boxes(landmarks, poses, intr, 64, 64)
    size = boxes[:, 2:] - boxes[:, :2]
    np.testing.assert_allclose(size, np.broadcast_to(size[0], size.shape), atol=1e-9)
    height = (2 + opening) * 1.7                          # lips + 2 x 35 % margin
    np.testing.assert_allclose(size[0], [20 * 1.7, np.median(height)], rtol=1e-5)
    centre_v = c - (0.02 * f - opening) / 2
    np.testing.assert_allclose((boxes[:, 1] + boxes[:, 3]) / 2, centre_v, atol=1e-4)
    assert np.ptp(frame_boxes[:, 3] - frame_boxes[:, 1]) >= 10      # they grow
    # A cavity 10 px wide between the lips, skin 200 elsewhere.
    frames = np.full((n, 64, 64, 3), 200, np.uint8)
    for t in range(n):
        lo, hi = int(round(c - 2)), int(round(c + opening[t]))
        frames[t, lo:hi, 27:37] = 20
    area = np.array([10 * (int(round(c + o)) - int(round(c - 2))) for o in opening])
    act = pl.mouth_pixel_activity(frames, boxes)
    np.testing.assert_allclose(act - act.mean(), (area - area.mean()) * 180 / 255
                               / (size[0, 0] * size[0, 1]), atol=1e-9)
    assert pl.pearson(pl.mouth_pixel_activity(frames, frame_boxes), area) < 0.8   # 0.58
    # Near the border the box is moved inside, not shrunk.
    shifted = landmarks + np.array([0.3, 0.0, 0.0])      # lips 30 px right: past the edge
    edge = pl.mouth_boxes(shifted, poses, intr, 64, 64)
    np.testing.assert_allclose(edge[:, 2], 64.0)
    np.testing.assert_allclose(edge[:, 2:] - edge[:, :2], size, atol=1e-9)
    with pytest.raises(ValueError, match="size"):
        pl.mouth_boxes(landmarks, poses, intr, 64, 64, size="grow")


def test_darkening_vs_truth_separates_mouth_response_from_pose_error():
    """A render that darkens half as much per unit of opening has half the truth's slope;
    an error that is a linear function of the pose is all pose (R^2 1), a random one is
    not."""
    rng = np.random.default_rng(0)
    n = 200
    opening = rng.uniform(0, 1, n)
    poses = np.tile(np.eye(4), (n, 1, 1))
    poses[:, :3, 3] = rng.normal(0, 0.02, (n, 3))
    truth = 0.02 * opening
    half = pl.darkening_vs_truth(0.01 * opening, truth, opening, poses)
    assert half["slope"] == pytest.approx(0.01) and half["truth_slope"] == pytest.approx(0.02)
    pose_err = truth + 0.3 * poses[:, 1, 3] - 0.1 * poses[:, 2, 3]
    out = pl.darkening_vs_truth(pose_err, truth, opening, poses)
    assert out["residual_pose_r2"] == pytest.approx(1.0) and out["residual_std"] > 0
    assert out["slope"] == pytest.approx(0.02, abs=2e-3)
    noise = pl.darkening_vs_truth(truth + rng.normal(0, 0.005, n), truth, opening, poses)
    assert noise["residual_pose_r2"] < 0.15
