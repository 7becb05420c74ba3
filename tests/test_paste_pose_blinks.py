"""Blink schedules, inference head poses and paste-back into the source frame
(`data.blinks`, `data.head_poses`, `render.paste`). Their use in synthesis is tested in
test_end_to_end.py, beside the tiny demo it renders with (one worker builds it once)."""

import numpy as np
import pytest

from geneface_jax.data import blinks
from geneface_jax.data import head_poses as hp
from geneface_jax.data import preprocess
from geneface_jax.data import landmarks as lm
from geneface_jax.data.head_space import camera_to_world
from geneface_jax.data.synthetic import oracle
from geneface_jax.errors import InputError, ShapeError, VideoError
from geneface_jax.render import paste


# --------------------------------------------------------------------------- blinks

def test_blink_schedule_is_a_pure_function_of_the_seed():
    a, b = blinks.blink_schedule(3, 1500), blinks.blink_schedule(3, 1500)
    c = blinks.blink_schedule(4, 1500)
    for f in ("starts", "durations", "peaks", "closure"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert not np.array_equal(a.closure, c.closure)


def test_blink_schedule_statistics_match_the_stated_ranges():
    minutes = 0.0
    count, durations, gaps = 0, [], []
    for seed in range(40):
        s = blinks.blink_schedule(seed, 25 * 600)          # 10 minutes each
        minutes += 10.0
        count += len(s.starts)
        durations.append(s.durations)
        gaps.append(np.diff(s.starts) - s.durations[:-1])
        assert s.closure.min() >= 0 and s.closure.max() <= 1
        np.testing.assert_array_equal(s.closure[s.peaks], 1.0)
    rate = count / minutes
    assert blinks.RATE_PER_MIN[0] <= rate <= blinks.RATE_PER_MIN[1], rate
    d = np.concatenate(durations)
    assert d.min() >= 0.1 and d.max() <= 0.4
    assert 0.18 <= np.median(d) <= 0.22
    assert np.concatenate(gaps).min() >= 1.0            # the refractory interval


def _eyes_track(n=300):
    """Landmarks of a face whose eyes blink (the synthetic world's face) `[n, 68, 3]`."""
    from geneface_jax.data.synthetic import face as face_lib
    shape = face_lib.sample_face_shape(np.random.default_rng(0))
    close = oracle.blinks(np.random.default_rng(1), n)
    artic = dict(open=np.zeros(n, np.float32), width=np.ones(n, np.float32),
                 smile=np.zeros(n, np.float32), blink=close)
    return face_lib.landmarks_3d(shape, artic), close


def test_eye_shapes_and_closure_move_only_the_eyes():
    lms, close = _eyes_track()
    open_eyes, closed_eyes, info = blinks.eye_shapes(lms)
    assert info["closed_ear"] < 0.5 * info["open_ear"]
    sched = blinks.blink_schedule(0, len(lms))
    out = blinks.apply_closure(lms, sched.closure, open_eyes, closed_eyes)
    others = np.setdiff1d(np.arange(68), blinks.EYES)
    np.testing.assert_array_equal(out[:, others], lms[:, others])
    ear = lm.eye_aspect_ratio(out)
    detected = blinks.detect_blinks(ear)
    hit, extra = blinks.match_blinks(sched.peaks, detected)
    assert len(sched.peaks) >= 1 and hit == 1.0 and extra == 0
    none = blinks.apply_closure(lms, np.zeros(len(lms)), open_eyes, closed_eyes)
    assert len(blinks.detect_blinks(lm.eye_aspect_ratio(none))) == 0


# --------------------------------------------------------------------------- poses

def _poses(n, seed=0, yaw_deg=5.0, depth=0.6):
    rng = np.random.default_rng(seed)
    ang = np.radians(rng.uniform(-yaw_deg, yaw_deg, (n, 3)))
    rot = oracle.rotation_matrix(ang[:, 0], ang[:, 1], ang[:, 2])
    trans = np.array([0.0, 0.02, -depth]) + rng.normal(0, 0.005, (n, 3))
    return camera_to_world(rot, trans).astype(np.float32)


def test_pose_spec_parsing():
    assert hp.parse_pose_spec("loop") == hp.PoseSpec("loop")
    assert hp.parse_pose_spec("static") == hp.PoseSpec("static", frame=0)
    assert hp.parse_pose_spec("static:7") == hp.PoseSpec("static", frame=7)
    assert hp.parse_pose_spec("x/poses.npy") == hp.PoseSpec("file", path="x/poses.npy")
    for bad in ("static:x", "static:-1", ""):
        with pytest.raises(InputError):
            hp.parse_pose_spec(bad)


def test_pose_files_of_the_wrong_shape_or_nan_are_refused(tmp_path):
    target = _poses(10)
    f = tmp_path / "p.npy"
    np.save(f, np.zeros((5, 3, 4), np.float32))
    with pytest.raises(ShapeError, match="p.npy"):
        hp.load_pose_file(f, target)
    bad = _poses(6)
    bad[3, 0, 3] = np.nan
    np.save(f, bad)
    with pytest.raises(InputError, match="frame 3"):
        hp.load_pose_file(f, target)
    np.save(f, 2.0 * _poses(4))                               # scaled: not rigid
    with pytest.raises(InputError, match="rigid"):
        hp.load_pose_file(f, target)
    with pytest.raises(InputError, match="does not exist"):
        hp.load_pose_file(tmp_path / "missing.npy", target)
    good = _poses(4, seed=3)
    np.save(f, good)
    np.testing.assert_allclose(hp.load_pose_file(f, target), good)


def test_pose_files_from_a_video_and_from_a_person_dataset(tmp_path):
    """A video is tracked with preprocessing's tracker and its head poses retargeted onto
    the target's mean pose (its roll follows the video's); a person dataset's poses are
    retargeted the same way."""
    from geneface_jax.data import format as fmt
    from geneface_jax.data.synthetic import realface, world
    video = tmp_path / "talk.mp4"
    truth = realface.make_talking_photo(video, seconds=2.0, size=256)
    target = _poses(30, seed=4)
    poses = hp.load_pose_file(video, target)
    assert poses.shape == (truth["num_frames"], 4, 4) and np.isfinite(poses).all()
    rot, trans = hp._head_to_camera(poses)
    _, t_tgt = hp._head_to_camera(target)
    np.testing.assert_allclose(trans.mean(0), t_tgt.mean(0), atol=1e-5)
    np.testing.assert_allclose(np.einsum("nij,nkj->nik", rot, rot),
                               np.broadcast_to(np.eye(3), rot.shape), atol=1e-5)
    roll = np.degrees(np.arctan2(rot[:, 1, 0], rot[:, 0, 0]))
    r = np.corrcoef(roll, truth["roll_deg"])[0, 1]
    assert abs(r) > 0.9, r                                     # the video's head roll
    arrays, meta, wav = world.make_person(3, size=32, num_frames=12, progress=False)
    fmt.write_person(tmp_path / "other", arrays, meta, wav)
    from_person = hp.load_pose_file(tmp_path / "other", target)
    assert from_person.shape == (12, 4, 4)
    np.testing.assert_allclose(hp._head_to_camera(from_person)[1].mean(0), t_tgt.mean(0),
                               atol=1e-5)
    with pytest.raises(InputError, match="pose file"):
        hp.load_pose_file(tmp_path / "other" / "meta.json", target)


def test_retarget_keeps_relative_motion_and_lands_on_the_target_mean():
    src = _poses(30, seed=1, depth=1.2)
    tgt = _poses(30, seed=2, depth=0.6)
    out = hp.retarget(src, src, tgt)
    r_out, t_out = hp._head_to_camera(out)
    r_src, t_src = hp._head_to_camera(src)
    _, t_tgt = hp._head_to_camera(tgt)
    np.testing.assert_allclose(t_out.mean(0), t_tgt.mean(0), atol=1e-6)
    # relative rotations between frames are unchanged
    rel_src = np.einsum("ij,kj->ik", r_src[5], r_src[0])
    rel_out = np.einsum("ij,kj->ik", r_out[5], r_out[0])
    assert np.abs(np.degrees(hp._rotvec((rel_src @ rel_out.T)[None]))).max() < 2.0
    # translations scaled by the depth ratio (0.6 / 1.2)
    np.testing.assert_allclose(t_out[:, :2] - t_out[:, :2].mean(0),
                               0.5 * (t_src[:, :2] - t_src[:, :2].mean(0)), atol=2e-3)


def test_out_of_range_poses_are_named():
    train = _poses(50, yaw_deg=5.0)
    inside = _poses(20, seed=9, yaw_deg=4.0)
    assert len(hp.out_of_range(inside, train)[0]) == 0
    wild = inside.copy()
    rot = oracle.rotation_matrix(np.radians(25.0), 0.0, 0.0)
    wild[[4, 11]] = camera_to_world(rot[None], np.array([[0.0, 0.02, -0.6]]))[0]
    messages = []
    bad = hp.warn_out_of_range(wild, train, log=messages.append)
    assert list(bad) == [4, 11]
    assert "4, 11" in messages[0]


# --------------------------------------------------------------------------- paste-back

def test_paste_of_the_crop_itself_gives_back_the_source():
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    crop = (100, 40, 128)
    render = src[40:168, 100:228]
    alpha = rng.uniform(0, 1, (128, 128)).astype(np.float32)
    region = np.zeros((128, 128), bool)
    region[20:110, 30:100] = True
    p = paste.Paster(crop, 256, 256, region=region)
    out = p.paste(src, render, alpha)
    assert np.abs(out.astype(int) - src.astype(int)).max() <= 1
    # outside the box (and where the weight is 0) exactly the source
    other = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    out = p.paste(src, other, np.zeros((128, 128), np.float32))
    mask = np.ones((256, 256), bool)
    mask[40:168, 100:228] = p.weights(np.zeros((128, 128))) == 0
    np.testing.assert_array_equal(out[mask], src[mask])
    # a render at another resolution is resized into the box
    out = paste.Paster(crop, 256, 256).paste(src, render[::2, ::2], np.ones((64, 64)))
    assert out.shape == src.shape


def test_border_ramp_is_soft_inside_the_frame_and_hard_at_its_edge():
    w = paste.border_ramp((0, 10, 64), 100, 100, 8)
    assert w[32, 0] == 1.0                   # the box's left edge is the frame's edge
    assert w[0, 32] < 0.1 and w[32, -1] < 0.1 and w[-1, 32] < 0.1
    assert w[32, 32] == 1.0
    with pytest.raises(ShapeError):
        paste.Paster((50, 50, 64), 100, 100)


def test_moved_or_changed_source_is_refused_naming_it(tmp_path):
    f = tmp_path / "source.mp4"
    f.write_bytes(b"not really a video but bytes")
    rec = preprocess.source_record(f, 256, 256, 25.0, (10, 20, 128), range(5))
    assert paste.check_source(rec) == f
    moved = tmp_path / "moved.mp4"
    f.rename(moved)
    with pytest.raises(VideoError, match="source.mp4"):
        paste.check_source(rec)
    assert paste.check_source(rec, override=moved) == moved
    moved.write_bytes(b"changed")
    with pytest.raises(VideoError, match="moved.mp4.*changed"):
        paste.check_source(rec, override=moved)
