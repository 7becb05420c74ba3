"""TFDS builders for the two dataset formats, TF-free (array_record + `as_data_source`).

Both builders read a dataset directory written by `geneface_jax.data.format` and write an
array_record TFDS dataset (by default under `<source>/tfds/`), which training reads with
random access and no TensorFlow:

  person: one example per video frame, splits 'train' / 'valid' (frame order kept).
    image [H, W, 3] uint8, mask [H, W] uint8, landmarks [68, 3], landmarks_2d [68, 2],
    pose [4, 4], face_rect [4] int32, blink, mel [2, C] (the frame's two feature frames),
    energy [2], index (frame number), plus oracle_* when synthetic.
    Static data (background, intrinsics, near/far, landmark stats, meta.json) is in the
    dataset's metadata: `builder.info.metadata`.
  corpus: one example per utterance, splits 'train' / 'valid' / 'test' (empty ones left
    out): mel [2T, C], energy [2T], landmarks [T, 68, 3], audio [T * 640] int16, speaker,
    index, plus oracle_* and style_mode when synthetic; landmark stats in the metadata.
"""

import pathlib

import numpy as np
import tensorflow_datasets as tfds

from geneface_jax.data import format as fmt

_VERSION = tfds.core.Version("1.0.0")


def _tensor(shape, dtype):
    return tfds.features.Tensor(shape=shape, dtype=dtype)


class _SourceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder whose examples come from a dataset directory of ours."""

    VERSION = _VERSION

    def __init__(self, *, source_dir, data_dir=None, **kwargs):
        self._source_dir = pathlib.Path(source_dir)
        self._source = self._load(self._source_dir)
        super().__init__(data_dir=str(data_dir or self._source_dir / "tfds"),
                         file_format="array_record", **kwargs)

    def _split_generators(self, dl_manager):
        del dl_manager
        return {name: self._generate_examples(idx) for name, idx in self._splits().items()
                if len(idx)}


class GenefacePerson(_SourceBuilder):
    """One example per frame of a person video dataset."""

    _load = staticmethod(fmt.load_person)

    def _info(self):
        src = self._source
        h, w, c = src.meta["height"], src.meta["width"], src.meta["feature_dim"]
        feats = dict(index=np.int32, image=_tensor((h, w, 3), np.uint8),
                     mask=_tensor((h, w), np.uint8), landmarks=_tensor((68, 3), np.float32),
                     landmarks_2d=_tensor((68, 2), np.float32),
                     pose=_tensor((4, 4), np.float32), face_rect=_tensor((4,), np.int32),
                     blink=np.float32, mel=_tensor((2, c), np.float32),
                     energy=_tensor((2,), np.float32))
        feats.update({k: np.float32 for k in fmt.PERSON_ORACLE if k in src.arrays})
        metadata = tfds.core.MetadataDict(
            meta=src.meta, background=np.asarray(src["background"]).tolist(),
            landmark_mean=np.asarray(src["landmark_mean"]).tolist(),
            landmark_std=np.asarray(src["landmark_std"]).tolist())
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(feats),
                                     metadata=metadata, disable_shuffling=True,
                                     description="geneface-jax person video dataset")

    def _splits(self):
        return {name: self._source.split(name) for name in self._source.meta["splits"]}

    def _generate_examples(self, frame_ids):
        a = self._source.arrays
        for i in frame_ids:
            ex = dict(index=int(i), image=a["frames"][i], mask=a["masks"][i],
                      landmarks=a["landmarks"][i], landmarks_2d=a["landmarks_2d"][i],
                      pose=a["poses"][i], face_rect=a["face_rect"][i],
                      blink=float(a["blink"][i]), mel=a["mel"][2 * i:2 * i + 2],
                      energy=a["energy"][2 * i:2 * i + 2])
            ex.update({k: float(a[k][i]) for k in fmt.PERSON_ORACLE if k in a})
            yield int(i), {k: np.asarray(v) if not np.isscalar(v) else v
                           for k, v in ex.items()}


class GenefaceCorpus(_SourceBuilder):
    """One example per utterance of an audio->motion corpus."""

    _load = staticmethod(fmt.load_corpus)

    def _info(self):
        src = self._source
        c = src.meta["feature_dim"]
        feats = dict(index=np.int32, speaker=np.int32, mel=_tensor((None, c), np.float32),
                     energy=_tensor((None,), np.float32),
                     landmarks=_tensor((None, 68, 3), np.float32),
                     audio=_tensor((None,), np.int16))
        feats.update({k: _tensor((None,), np.float32)
                      for k in ("oracle_open", "oracle_width", "oracle_smile", "oracle_blink")
                      if k in src.arrays})
        if "style_mode" in src.arrays:
            feats["style_mode"] = np.int32
        metadata = tfds.core.MetadataDict(
            meta=src.meta, landmark_mean=np.asarray(src["landmark_mean"]).tolist(),
            landmark_std=np.asarray(src["landmark_std"]).tolist())
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(feats),
                                     metadata=metadata, disable_shuffling=True,
                                     description="geneface-jax audio-to-motion corpus")

    def _splits(self):
        return {name: self._source.split(name) for name in fmt.SPLITS}

    def _generate_examples(self, utt_ids):
        a = self._source.arrays
        for i in utt_ids:
            spk, start, num, _ = (int(v) for v in a["utterances"][i])
            spf = 2 * len(a["audio"]) // len(a["mel"])
            ex = dict(index=int(i), speaker=spk, mel=a["mel"][2 * start:2 * (start + num)],
                      energy=a["energy"][2 * start:2 * (start + num)],
                      landmarks=a["landmarks"][start:start + num],
                      audio=a["audio"][start * spf:(start + num) * spf])
            for k in ("oracle_open", "oracle_width", "oracle_smile", "oracle_blink"):
                if k in a:
                    ex[k] = a[k][start:start + num]
            if "style_mode" in a:
                ex["style_mode"] = int(a["style_mode"][i])
            yield int(i), {k: np.asarray(v) if not np.isscalar(v) else v
                           for k, v in ex.items()}


def build(kind, source_dir, data_dir=None, progress=True):
    """Builds (if not built yet) the TFDS dataset of a source directory; returns the builder.

    Args:
      kind: 'person' or 'corpus'.
      source_dir: a directory written by `format.write_person` / `write_corpus`.
      data_dir: where the TFDS dataset goes (default `<source_dir>/tfds`).
      progress: show TFDS's progress bars.
    """
    if not progress:
        tfds.disable_progress_bar()
    cls = {"person": GenefacePerson, "corpus": GenefaceCorpus}[kind]
    builder = cls(source_dir=source_dir, data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(verify_ssl=False))
    return builder


def data_sources(kind, source_dir, data_dir=None, progress=False):
    """Random-access sources {split: source} of a built dataset (builds it if needed).

    `source[i]` is a dict of NumPy arrays; no TensorFlow is imported.
    """
    return build(kind, source_dir, data_dir, progress).as_data_source()
