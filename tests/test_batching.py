"""Stage-1 batches (`data.batching`): every batch is a pure function of (seed, step), an
epoch's batches split over the devices give every device disjoint rows that together read
each utterance once, and the global batch is the same on 1 and on 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geneface_jax.data import batching
from geneface_jax.errors import ShapeError
from geneface_jax.mesh import DATA_AXIS, make_mesh
from geneface_jax.train import parallel

NUM_UTTERANCES = 24
FEATURES = 3


def _utterances(n=NUM_UTTERANCES):
    """An UtteranceSet whose utterance i has 8 + 2 (i % 7) frames, every motion value
    i + frame / 1000 and every feature -i, so a batch row names its utterance."""
    mel, motion, mouth = [], [], []
    for i in range(n):
        t = 8 + 2 * (i % 7)
        frame = np.arange(t, dtype=np.float32)[:, None] / 1000.0
        motion.append(np.broadcast_to(i + frame, (t, 204)).astype(np.float32))
        mel.append(np.full((2 * t, FEATURES), -i, np.float32))
        mouth.append(np.linspace(0.0, 1.0, t, dtype=np.float32))
    return batching.UtteranceSet(mel=mel, motion=motion, mouth_open=mouth,
                                 speaker=np.arange(n, dtype=np.int64) % 4)


def _rows(batch):
    """The utterance of every row of a window batch (from its features)."""
    return (-batch["mel"][:, 0, 0]).astype(np.int64)


def _assert_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batches_are_a_pure_function_of_seed_and_step():
    utts = _utterances()
    for make in (lambda seed: batching.make_batch_fn(utts, batch_size=8, window=8, seed=seed),
                 lambda seed: batching.make_sync_batch_fn(utts, batch_size=8, seed=seed)):
        first = make(5)
        forward = [first(s) for s in range(6)]
        # Another function, asked in another order (a resumed run starts at any step).
        again = make(5)
        for s in (4, 0, 5, 2, 1, 3, 4):
            _assert_equal(again(s), forward[s])
        # Another step or another seed reads other data.
        key = "mel" if "mel" in forward[0] else "audio"
        assert not np.array_equal(forward[0][key], forward[1][key])
        assert not np.array_equal(make(6)(0)[key], forward[0][key])


def test_windows_crop_long_and_pad_short_utterances():
    utts = _utterances()
    batch = batching.make_batch_fn(utts, batch_size=NUM_UTTERANCES, window=12, seed=0)(0)
    for row, i in enumerate(_rows(batch)):
        n = min(len(utts.motion[i]), 12)
        assert batch["mask"][row, :, 0].sum() == n
        assert not batch["motion"][row, n:].any() and not batch["mel"][row, 2 * n:].any()
        start = round((batch["motion"][row, 0, 0] - i) * 1000)       # the crop's offset
        np.testing.assert_array_equal(batch["motion"][row, :n],
                                      utts.motion[i][start:start + n])
        np.testing.assert_array_equal(batch["mouth_open"][row, :n],
                                      utts.mouth_open[i][start:start + n])
        assert batch["speaker"][row] == i % 4
    with pytest.raises(ShapeError, match="multiple of 4"):
        batching.make_batch_fn(utts, batch_size=4, window=10, seed=0)


@pytest.mark.parametrize("devices", [1, 4, 8])
def test_device_shards_are_disjoint_and_cover_the_epoch(devices):
    """Each step's global batch is split over the devices in row blocks: over one epoch
    (NUM_UTTERANCES / batch_size steps) the devices' rows are disjoint and every
    utterance is read exactly once."""
    utts = _utterances()
    batch_size = 8
    get_batch = batching.make_batch_fn(utts, batch_size=batch_size, window=8, seed=3)
    mesh = make_mesh(jax.devices()[:devices])
    for epoch in range(2):
        rows = {}                                    # device -> its rows of the epoch
        for step in range(epoch * 3, (epoch + 1) * 3):
            sharded = parallel.shard_batch(get_batch(step), mesh)
            for shard in sharded["mel"].addressable_shards:
                ids = (-np.asarray(shard.data)[:, 0, 0]).astype(np.int64)
                assert len(ids) == batch_size // devices
                rows.setdefault(shard.device, []).extend(ids)
        assert len(rows) == devices
        # Disjoint and covering: the devices' rows of the epoch are a permutation.
        assert sorted(sum(rows.values(), [])) == list(range(NUM_UTTERANCES)), epoch


def test_one_and_eight_devices_see_the_same_global_batch():
    """The global batch does not depend on the device count: the 8-device shards are the
    1-device batch's row blocks, and a data-parallel step's global reductions agree."""
    utts = _utterances()
    one, eight = make_mesh(jax.devices()[:1]), make_mesh(jax.devices()[:8])
    assert len(jax.devices()) >= 8
    for get_batch in (batching.make_batch_fn(utts, batch_size=16, window=8, seed=1),
                      batching.make_sync_batch_fn(utts, batch_size=16, seed=1)):
        batch = get_batch(4)
        a, b = parallel.shard_batch(batch, one), parallel.shard_batch(batch, eight)
        for k in batch:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
            for d, shard in enumerate(sorted(b[k].addressable_shards,
                                             key=lambda s: s.index[0].start)):
                np.testing.assert_array_equal(np.asarray(shard.data),
                                              batch[k][2 * d:2 * d + 2], err_msg=k)

    def step(state, batch, rng):
        del rng
        key = "motion" if "motion" in batch else "mouth"
        w = jnp.ones(batch[key].shape[:1])
        values = batch[key].reshape(batch[key].shape[0], -1)
        metrics = {"mean": parallel.global_mean(values.mean(1), w),
                   "rows": jax.lax.psum(values.shape[0], DATA_AXIS)}
        return state, metrics

    for get_batch in (batching.make_batch_fn(utts, batch_size=16, window=8, seed=1),
                      batching.make_sync_batch_fn(utts, batch_size=16, seed=1)):
        batch = get_batch(2)
        out = [parallel.data_parallel(step, mesh, donate_state=False)(
            jnp.zeros(()), batch, jax.random.PRNGKey(0))[1] for mesh in (one, eight)]
        assert int(out[0]["rows"]) == int(out[1]["rows"]) == 16
        np.testing.assert_allclose(float(out[0]["mean"]), float(out[1]["mean"]), rtol=1e-6)
