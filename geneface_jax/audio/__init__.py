"""Audio front-end: load any audio file as 16 kHz mono, features at exactly 50 Hz."""

from geneface_jax.audio.features import (FEATURE_RATE, HOP, N_MELS, SAMPLE_RATE,
                                         SAMPLES_PER_VIDEO_FRAME, VIDEO_FPS, compute_features,
                                         energy_db, featurize_file, frame_energy, log_mel,
                                         num_video_frames, pad_or_trim)
from geneface_jax.audio.io import load_audio, save_wav

__all__ = ["FEATURE_RATE", "HOP", "N_MELS", "SAMPLE_RATE", "SAMPLES_PER_VIDEO_FRAME",
           "VIDEO_FPS", "compute_features", "energy_db", "featurize_file", "frame_energy",
           "log_mel", "num_video_frames", "pad_or_trim", "load_audio", "save_wav"]
