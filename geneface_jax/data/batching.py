"""Batches for audio->motion training: fixed-shape windows of corpus utterances.

Every batch is a pure function of (seed, step), so resumed runs see the same data:
utterances are drawn with `data.epochs.epoch_indices`, and the crop offset of each is drawn
from a generator seeded by (seed, step, slot). Shapes are fixed (XLA compiles once):
utterances longer than the window are cropped at a random offset, shorter ones are padded
and masked.

Motion targets are identity-removed landmarks, normalised: `(lms - identity) / std`,
flattened to `[T, 204]` (68 points x 3, point-major). The identity of a speaker is the mean
of all its landmarks (`speaker_identities`), the counterpart of GeneFace's identity-free
"idexp" landmarks (there the 3DMM identity is removed); `std` is the per-coordinate std
of the identity-removed landmarks of the train split (`expression_std`). Inference adds
the target person's identity back: `landmarks = motion * std + identity`.
"""

import dataclasses

import numpy as np

from geneface_jax.data.epochs import epoch_indices
from geneface_jax.errors import ShapeError


def normalize_landmarks(lms, mean, std):
    """`[..., 68, 3]` landmarks -> `[..., 204]` normalised motion."""
    lms = np.asarray(lms, np.float32)
    return ((lms - mean) / std).reshape(lms.shape[:-2] + (-1,))


def denormalize_motion(motion, mean, std):
    """`[..., 204]` normalised motion -> `[..., 68, 3]` landmarks."""
    motion = np.asarray(motion, np.float32)
    return motion.reshape(motion.shape[:-1] + (68, 3)) * std + mean


def speaker_identities(corpus):
    """`{speaker id: [68, 3]}`: the mean landmarks of every speaker over all its frames."""
    utt = np.asarray(corpus["utterances"])
    lms = corpus["landmarks"]
    sums, counts = {}, {}
    for spk, start, num, _ in utt:
        spk = int(spk)
        block = np.asarray(lms[start:start + num], np.float64)
        sums[spk] = sums.get(spk, 0.0) + block.sum(0)
        counts[spk] = counts.get(spk, 0) + num
    return {k: (sums[k] / counts[k]).astype(np.float32) for k in sums}


def expression_std(corpus, identities=None, min_std=1e-4):
    """Per-coordinate std `[68, 3]` of identity-removed landmarks over the train split."""
    identities = speaker_identities(corpus) if identities is None else identities
    utt = np.asarray(corpus["utterances"])
    lms = corpus["landmarks"]
    total, sq, count = 0.0, 0.0, 0
    for spk, start, num, split in utt:
        if split != 0:
            continue
        block = np.asarray(lms[start:start + num], np.float64) - identities[int(spk)]
        total = total + block.sum(0)
        sq = sq + np.square(block).sum(0)
        count += num
    if not count:
        raise ShapeError(f"{corpus.path}: the train split is empty")
    mean = total / count
    return np.maximum(np.sqrt(np.maximum(sq / count - mean ** 2, 0.0)), min_std).astype(np.float32)


@dataclasses.dataclass
class UtteranceSet:
    """Utterances held in memory: lists of `mel [2T, C]`, `motion [T, 204]`, `identity`
    `[68, 3]` per utterance, `landmarks [T, 68, 3]`, optional `mouth_open [T]` (oracle),
    and `speaker` ids."""
    mel: list
    motion: list
    mouth_open: list
    speaker: np.ndarray
    identity: list = dataclasses.field(default_factory=list)
    landmarks: list = dataclasses.field(default_factory=list)
    index: list = dataclasses.field(default_factory=list)

    def __len__(self):
        return len(self.mel)

    @classmethod
    def from_corpus(cls, corpus, split, std, identities=None):
        """Loads one split of a `format.Corpus` as identity-removed motion `/ std`."""
        identities = speaker_identities(corpus) if identities is None else identities
        std = np.asarray(std, np.float32)
        out = cls([], [], [], np.zeros(0, np.int64))
        spk = []
        for i in corpus.split(split):
            u = corpus.utterance(int(i))
            ident = identities[u["speaker"]]
            out.mel.append(u["mel"])
            out.motion.append(normalize_landmarks(u["landmarks"], ident, std))
            out.mouth_open.append(u.get("oracle_open"))
            out.identity.append(ident)
            out.landmarks.append(u["landmarks"])
            out.index.append(int(i))
            spk.append(u["speaker"])
        if not out.mel:
            raise ShapeError(f"{corpus.path}: split {split!r} has no utterances")
        out.speaker = np.asarray(spk, np.int64)
        return out


def window_batch(utts, indices, window, rng):
    """Crops/pads the given utterances to `window` frames.

    Returns dict: `mel` `[B, 2W, C]`, `motion` `[B, W, D]`, `mask` `[B, W, 1]` float32,
    `mouth_open` `[B, W]` (zeros where unknown), `speaker` `[B]`.
    """
    b = len(indices)
    c = utts.mel[0].shape[1]
    d = utts.motion[0].shape[1]
    out = dict(mel=np.zeros((b, 2 * window, c), np.float32),
               motion=np.zeros((b, window, d), np.float32),
               mask=np.zeros((b, window, 1), np.float32),
               mouth_open=np.zeros((b, window), np.float32),
               speaker=utts.speaker[np.asarray(indices)])
    for slot, i in enumerate(indices):
        num = len(utts.motion[i])
        start = int(rng.integers(0, num - window + 1)) if num > window else 0
        n = min(num, window)
        out["mel"][slot, :2 * n] = utts.mel[i][2 * start:2 * (start + n)]
        out["motion"][slot, :n] = utts.motion[i][start:start + n]
        out["mask"][slot, :n] = 1.0
        if utts.mouth_open[i] is not None:
            out["mouth_open"][slot, :n] = utts.mouth_open[i][start:start + n]
    return out


def make_batch_fn(utts, *, batch_size, window, seed):
    """`get_batch(step)` for `train.train_loop`: random windows, pure in (seed, step)."""
    if window % 4:
        raise ShapeError(f"window must be a multiple of 4 frames (latent rate), got {window}")

    def get_batch(step):
        idx = epoch_indices(seed, step, len(utts), batch_size)
        return window_batch(utts, idx, window, np.random.default_rng([seed, step, 7]))
    return get_batch


def padded_length(num_frames, multiple=4):
    """Smallest multiple of `multiple` >= num_frames."""
    return -(-int(num_frames) // multiple) * multiple


def full_batches(utts, batch_size, multiple=4):
    """Whole utterances for evaluation, `batch_size` at a time, each padded to the longest
    in its batch (rounded up to `multiple`); yields (indices, batch dict)."""
    order = np.argsort([len(m) for m in utts.motion], kind="stable")
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        window = padded_length(max(len(utts.motion[i]) for i in idx), multiple)
        yield idx, window_batch(utts, idx, window, np.random.default_rng(0))


def _mouth(motion):
    """`[..., 204]` normalised motion -> the 20 mouth points `[..., 60]` (NumPy)."""
    from geneface_jax.data.landmarks import MOUTH
    pts = motion.reshape(motion.shape[:-1] + (68, 3))
    return pts[..., MOUTH, :].reshape(motion.shape[:-1] + (3 * len(MOUTH),))


def sync_pairs(utts, indices, window, rng, min_shift=3):
    """SyncNet training pairs from the given utterances, one per index.

    Each pair takes the audio features of frames [s, s + W) (feature rows [2s, 2s + 2W));
    with probability 1/2 the mouth window is the same frames (label 1), otherwise frames
    [s', s' + W) of the same utterance with |s' - s| >= min_shift (label 0; an utterance
    too short for that borrows the window of another utterance).

    Returns dict: `audio` [B, 2W, C], `mouth` [B, W, 60], `label` [B] float32.
    """
    b = len(indices)
    c = utts.mel[0].shape[1]
    out = dict(audio=np.zeros((b, 2 * window, c), np.float32),
               mouth=np.zeros((b, window, 60), np.float32),
               label=np.zeros((b,), np.float32))
    for slot, i in enumerate(indices):
        num = len(utts.motion[i])
        if num < window:
            raise ShapeError(f"utterance {i} has {num} frames, fewer than the sync window "
                             f"{window}")
        s = int(rng.integers(0, num - window + 1))
        out["audio"][slot] = utts.mel[i][2 * s:2 * (s + window)]
        positive = rng.random() < 0.5
        if positive:
            j, s2 = i, s
        else:
            far = np.flatnonzero(np.abs(np.arange(num - window + 1) - s) >= min_shift)
            if len(far):
                j, s2 = i, int(rng.choice(far))
            else:
                j = int((i + 1 + rng.integers(0, len(utts) - 1)) % len(utts)) \
                    if len(utts) > 1 else i
                nj = len(utts.motion[j])
                s2 = int(rng.integers(0, max(nj - window, 0) + 1))
        out["mouth"][slot] = _mouth(utts.motion[j][s2:s2 + window])
        out["label"][slot] = 1.0 if positive else 0.0
    return out


def make_sync_batch_fn(utts, *, batch_size, window=5, seed, min_shift=3):
    """`get_batch(step)` of SyncNet pairs, pure in (seed, step)."""
    def get_batch(step):
        idx = epoch_indices(seed, step, len(utts), batch_size)
        return sync_pairs(utts, idx, window, np.random.default_rng([seed, step, 11]), min_shift)
    return get_batch
