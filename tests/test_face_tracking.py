"""The tracker metric (render.face_tracking) on the synthetic person's ground-truth frames."""

import numpy as np
import pytest
from scipy import ndimage

from geneface_jax.data import face_models
from geneface_jax.data import landmarks as lm
from geneface_jax.data.synthetic import world
from geneface_jax.errors import ShapeError
from geneface_jax.render import face_tracking as ft


@pytest.fixture(scope="module")
def tracker():
    for name in face_models.MODELS:
        face_models.model_path(name)      # a clear ModelError (with the command) if missing
    return ft.FrameTracker()


@pytest.fixture(scope="module", params=[96, 128])
def person(request):
    """(frames uint8 [30, S, S, 3], ground-truth head-space landmarks [30, 68, 3])."""
    arrays, _, _ = world.make_person(3, size=request.param, num_frames=30)
    return arrays["frames"], arrays["landmarks"]


def test_ground_truth_is_found_and_matches_itself(person, tracker):
    frames, _ = person
    out = ft.track_and_compare(frames, frames, tracker)
    assert out["face_found"] == 1.0 and out["frames_both"] == len(frames)
    assert out["lmd_mouth"] == 0.0 and out["lmd_face"] == 0.0
    assert out["tracked_mouth_r"] == pytest.approx(1.0)


def test_a_one_pixel_shift_reads_as_one_pixel(person, tracker):
    frames, _ = person
    shifted = np.concatenate([frames[:, :, :1], frames[:, :, :-1]], axis=2)   # right by 1
    out = ft.track_and_compare(shifted, frames, tracker)
    assert out["frames_both"] == len(frames)
    assert abs(out["lmd_face"] - 1.0) <= 0.2 and abs(out["lmd_mouth"] - 1.0) <= 0.2
    assert out["lmd_face_512"] == pytest.approx(out["lmd_face"] * 512 / frames.shape[2])


def test_noise_floor_is_below_the_one_pixel_shift(person, tracker, tmp_path):
    frames, _ = person
    floor = ft.noise_floor(frames, tmp_path, tracker)
    assert 0.0 < floor["floor_lmd_mouth"] < 1.0 and floor["floor_lmd_face"] < 1.0
    assert floor["floor_tracked_mouth_r"] > 0.8
    assert list(tmp_path.iterdir()) == []


def test_a_blurred_render_scores_worse(person, tracker):
    frames, _ = person
    sharp = ft.track_and_compare(np.concatenate([frames[:, :, :1], frames[:, :, :-1]], 2),
                                 frames, tracker)
    blurred = np.stack([ndimage.gaussian_filter(f.astype(np.float32), (3, 3, 0))
                        for f in frames]).round().clip(0, 255).astype(np.uint8)
    out = ft.track_and_compare(blurred, frames, tracker)
    worse_lmd = out["frames_both"] == 0 or out["lmd_face"] > sharp["lmd_face"]
    worse_found_or_r = (out["face_found"] < sharp["face_found"]
                        or out["tracked_mouth_r"] < sharp["tracked_mouth_r"])
    assert worse_lmd and worse_found_or_r
    assert out["frames"] == len(frames)                  # missing faces are counted


def test_tracked_mouth_follows_the_true_opening(person, tracker):
    frames, landmarks = person
    truth = lm.mouth_opening(landmarks)
    out = ft.tracked_sync(frames, truth, tracker)
    assert out["face_found"] == 1.0 and out["r"] > 0.8
    assert np.isnan(ft.tracked_sync(frames, np.ones(len(frames)), tracker)["r"])


def test_bad_frames_are_refused(tracker):
    good = np.zeros((2, 32, 32, 3), np.uint8)
    for bad in (good.astype(np.float32), good[..., :2], good[0], good[:0]):
        with pytest.raises(ShapeError, match="renders"):
            ft.track_and_compare(bad, good, tracker)
    with pytest.raises(ShapeError, match="same shape"):
        ft.track_and_compare(good, np.zeros((3, 32, 32, 3), np.uint8), tracker)
    with pytest.raises(ShapeError, match="one per frame"):
        ft.tracked_sync(good, np.zeros(3), tracker)


def test_upsample_factor():
    assert ft.upsample_factor(96, 96) == 4 and ft.upsample_factor(128, 128) == 3
    assert ft.upsample_factor(512, 640) == 1


def test_benchmark_smoke(tracker):
    import json
    import subprocess
    import sys

    from conftest import REPO
    p = subprocess.run([sys.executable, "-m", "experiments.bench.tracking", "--frames=4",
                        "--repeats=1", "--size=64"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["frames_per_s"] > 0 and set(out["ms_per_frame"]) == {"upsample", "detect",
                                                                     "mesh"}


def test_tracked_video_report_of_the_ground_truth_video(person, tracker, tmp_path):
    """`pipeline.tracked_video_report` decodes and tracks a video in chunks: the person's
    own frames as a video follow their landmarks, whatever the chunk size."""
    from geneface_jax import pipeline as pl
    from geneface_jax.data import video
    frames, landmarks = person
    path = video.write_video(tmp_path / "truth.mp4", frames)
    out = pl.tracked_video_report(path, landmarks, landmarks, tracker=tracker, chunk=7)
    assert out["tracked_frames"] == len(frames) and out["face_found"] == 1.0
    assert out["tracked_sync_r"] > 0.8 and out["tracked_oracle_r"] == out["tracked_sync_r"]
    whole = pl.tracked_video_report(path, landmarks, tracker=tracker)
    assert whole["tracked_sync_r"] == out["tracked_sync_r"] and "tracked_oracle_r" not in whole
