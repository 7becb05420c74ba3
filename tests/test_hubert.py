"""HuBERT encoder: equivalence with transformers, the frame rule, windowing, loading.

The equivalence tests build transformers' `HubertModel` from tiny configs in both layouts
of the real checkpoints (base: GroupNorm on the first conv, post-LN encoder, no conv bias;
large: LayerNorm after every conv, pre-LN encoder, conv bias), fill every parameter with
random values unlike the default init (LayerNorm scales around 1, biases non-zero,
weight-norm g positive), and compare last_hidden_state on the valid frames of a
variable-length batch.
"""

import json

import jax
import numpy as np
import pytest

from geneface_jax.audio import features as audio_features
from geneface_jax.audio import hubert as hb
from geneface_jax.audio.hubert_weights import hubert_from_torch
from geneface_jax.errors import AudioError, CheckpointError

LENGTHS = (16000, 11000, 7000)
ATOL = 1e-4

# (feat_extract_norm, do_stable_layer_norm, conv_bias, pos kernel, give the attention mask)
VARIANTS = [("group", False, False, 16, False), ("group", False, False, 7, True),
            ("layer", True, True, 16, True), ("layer", True, True, 7, True)]


def _ids(v):
    return f"{v[0]}-k{v[3]}-{'mask' if v[4] else 'nomask'}"


@pytest.fixture(scope="module")
def hf():
    """(torch, transformers), or skip when the test extras are missing."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(1)
    return torch, transformers


def _hf_config(transformers, norm, stable, bias, kernel, layers=2):
    return transformers.HubertConfig(
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=37,
        conv_dim=(8, 12, 12, 16, 16, 16, 24), conv_bias=bias, feat_extract_norm=norm,
        do_stable_layer_norm=stable, num_conv_pos_embeddings=kernel,
        num_conv_pos_embedding_groups=4)


def _randomize(torch, model, seed):
    """Every parameter random and unlike the default init; eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:      # conv / linear weights, weight-norm v: ~unit gain
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            elif name.endswith(("original0", "weight_g")):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif name.endswith("weight"):   # norm scales
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            else:                           # biases, masked_spec_embed
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _tiny(hf, variant, seed=0, layers=2):
    """(torch model, our config, converted params) of a random tiny HuBERT."""
    torch, transformers = hf
    norm, stable, bias, kernel, _ = variant
    cfg = _hf_config(transformers, norm, stable, bias, kernel, layers)
    model = _randomize(torch, transformers.HubertModel(cfg), seed)
    config = hb.HubertConfig.from_dict(cfg.to_dict())
    return model, config, hubert_from_torch(model.state_dict(), config)


def _batch(seed=0):
    """Zero-padded batch [3, 16000] of LENGTHS and its sample mask."""
    rng = np.random.default_rng(seed)
    x = np.zeros((len(LENGTHS), max(LENGTHS)), np.float32)
    mask = np.zeros(x.shape, np.int64)
    for i, n in enumerate(LENGTHS):
        x[i, :n] = 0.5 * rng.normal(size=n)
        mask[i, :n] = 1
    return x, mask


def _shapes(tree):
    return jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), tree)


def _max_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def _speech(speech_dir, seconds):
    import soundfile as sf
    wav, rate = sf.read(speech_dir / "en_us_male.wav", dtype="float32")
    assert rate == 16000 and len(wav) >= seconds * rate
    return wav[:int(seconds * rate)]


# --------------------------------------------------------------------------- equivalence

@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_matches_transformers(hf, variant):
    torch = hf[0]
    model, config, params = _tiny(hf, variant, seed=1)
    use_mask = variant[4]
    init = jax.eval_shape(lambda: hb.HubertModel(config).init(
        jax.random.PRNGKey(0), np.zeros((1, 2000), np.float32)))["params"]
    assert _shapes(params) == _shapes(init)
    expected_leaves = len([k for k in model.state_dict() if k != "masked_spec_embed"])
    assert len(jax.tree_util.tree_leaves(params)) == expected_leaves

    x, mask = _batch()
    with torch.no_grad():
        ref = model(torch.from_numpy(x),
                    attention_mask=torch.from_numpy(mask) if use_mask else None)
    ref = ref.last_hidden_state.numpy()
    out = np.asarray(hb.hubert_forward(params, config, x, mask if use_mask else None))
    assert out.shape == ref.shape == (3, hb.feature_lengths(config, x.shape[1]), 32)
    frames = hb.feature_lengths(config, np.array(LENGTHS))
    assert list(frames) == [49, 34, 21]
    errs = [_max_err(out[i, :f], ref[i, :f]) for i, f in enumerate(frames)]
    print(f"max abs err {_ids(variant)}: {max(errs):.2e} (|ref| max {np.abs(ref).max():.2f})")
    assert max(errs) <= ATOL
    assert np.abs(ref).max() > 1.0   # non-trivial

    if use_mask and variant[0] == "layer":
        # LayerNorm models: masked padding has no influence, a row equals its clip alone.
        with torch.no_grad():
            alone = model(torch.from_numpy(x[2:, :LENGTHS[2]])).last_hidden_state.numpy()
        assert _max_err(out[2, :frames[2]], alone[0]) <= ATOL


def test_converter_key_styles_and_prefix(hf):
    model, config, params = _tiny(hf, VARIANTS[0], seed=2)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    # old-style weight-norm keys + HubertForCTC's `hubert.` prefix and head
    old = {"hubert." + k.replace("parametrizations.weight.original0", "weight_g")
           .replace("parametrizations.weight.original1", "weight_v"): v for k, v in sd.items()}
    old["lm_head.weight"] = np.zeros((5, 32), np.float32)
    assert "hubert.encoder.pos_conv_embed.conv.weight_g" in old
    converted = hubert_from_torch(old, config)
    jax.tree_util.tree_map(np.testing.assert_array_equal, converted, params)

    missing = dict(sd)
    del missing["encoder.layers.1.feed_forward.output_dense.bias"]
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.1\.feed_forward\.output_dense"
                                              r"\.bias"):
        hubert_from_torch(missing, config)
    with pytest.raises(CheckpointError, match="feature_projection.projection.weight"):
        hubert_from_torch({"foo.weight": np.zeros(3)}, config)
    wrong = hb.HubertConfig.from_dict({**model.config.to_dict(), "intermediate_size": 38})
    with pytest.raises(CheckpointError, match="intermediate_dense.weight' has shape"):
        hubert_from_torch(sd, wrong)
    fewer = hb.HubertConfig.from_dict({**model.config.to_dict(), "num_hidden_layers": 1})
    with pytest.raises(CheckpointError, match="more encoder layers"):
        hubert_from_torch(sd, fewer)


# --------------------------------------------------------------------------- frame rule

def _layer_config(layers=0, kernel=16):
    return hb.HubertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                           intermediate_size=37, conv_dim=(8, 12, 12, 16, 16, 16, 24),
                           conv_bias=True, feat_extract_norm="layer", do_stable_layer_norm=True,
                           num_conv_pos_embeddings=kernel, num_conv_pos_embedding_groups=4)


def _random_params(config, seed):
    """Random params of `HubertModel(config)` from the init's shapes (NumPy: no compile)."""
    shapes = jax.eval_shape(lambda: hb.HubertModel(config).init(
        jax.random.PRNGKey(0), np.zeros((1, 4000), np.float32)))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name in ("kernel", "weight_v"):
            return rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        if name in ("scale", "weight_g"):
            return 1.0 + 0.3 * rng.uniform(-1, 1, size=leaf.shape)
        return 0.3 * rng.normal(size=leaf.shape)

    return jax.tree_util.tree_map_with_path(lambda p, l: draw(p, l).astype(np.float32), shapes)


def test_frame_count_is_two_per_video_frame():
    config = hb.HubertConfig(conv_dim=(8,) * 7)      # the real conv stack geometry
    assert (config.hop, config.receptive_field, hb.frame_padding(config)) == (320, 400, 40)
    for n in list(range(640, 3000, 37)) + [16000, 16319, 16320, 16321, 20479, 48000 + 333]:
        x, frames = hb.aligned_input(config, np.ones(n, np.float32), normalize=False)
        video = audio_features.num_video_frames(n)
        assert frames == 2 * video and len(x) == 640 * video + 80
        assert hb.feature_lengths(config, len(x)) == frames

    small = _layer_config()
    params = _random_params(small, 0)
    rng = np.random.default_rng(0)
    for n in (640, 961, 7000, 16000, 16321, 20479):
        wav = rng.normal(size=n).astype(np.float32)
        out = hb.hubert_features(params, small, wav, window_seconds=0.2, context_seconds=0.1)
        assert out.shape == (2 * audio_features.num_video_frames(n), 32)
        assert out.dtype == np.float32 and np.all(np.isfinite(out))
    with pytest.raises(AudioError, match="shorter than one video frame"):
        hb.hubert_features(params, small, np.zeros(600, np.float32))


def test_impulse_reaches_exactly_the_frames_whose_window_holds_it():
    """Conv stack of a LayerNorm model (local: no statistics over time): an impulse at
    sample s changes feature frame i iff s lies in [320 i - 40, 320 i + 360), the 400
    samples centred on 320 i + 160. So s on a frame centre reaches that frame only, s on a
    hop boundary 320 j reaches frames j - 1 and j, symmetrically."""
    config = _layer_config()
    params = _random_params(config, 1)
    n = 6400                                           # N = 10 video frames, 20 features
    rng = np.random.default_rng(1)
    base = (0.3 * rng.normal(size=n)).astype(np.float32)
    spots = [0, 39, 40, 159, 160, 161, 200, 320, 359, 360, 3200 + 160, 6399]
    rows = [hb.aligned_input(config, base, normalize=False)[0]]
    for s in spots:
        wav = base.copy()
        wav[s] += 5.0
        rows.append(hb.aligned_input(config, wav, normalize=False)[0])
    extract = jax.jit(lambda p, x: hb.HubertModel(config).apply(
        {"params": p}, x, method=hb.HubertModel.extract_features))
    feats = np.asarray(extract(params, np.stack(rows)))
    assert feats.shape[1] == 20
    change = np.max(np.abs(feats[1:] - feats[:1]), axis=-1)        # [spots, frames]
    centres = 320 * np.arange(20) + 160
    for s, row in zip(spots, change):
        expected = np.flatnonzero((s >= centres - 200) & (s < centres + 200))
        np.testing.assert_array_equal(np.flatnonzero(row > 1e-6), expected, err_msg=f"s={s}")
    assert list(np.flatnonzero(change[spots.index(3360)] > 1e-6)) == [10]
    assert list(np.flatnonzero(change[spots.index(320)] > 1e-6)) == [0, 1]


# --------------------------------------------------------------------------- windowing

def test_windowed_equals_single_pass_without_attention(speech_dir):
    """Without attention layers the model is local (conv stack: 400 samples, positional
    conv: +-8 frames here), so windows with context >= 8 frames reproduce the single pass
    everywhere, edges and seams included; too little context shows at the seams."""
    config = _layer_config(layers=0, kernel=16)
    params = _random_params(config, 2)
    wav = _speech(speech_dir, 3.0)                      # 150 feature frames
    full = hb.hubert_features(params, config, wav, window_seconds=None)
    assert full.shape == (150, 32)
    windowed = hb.hubert_features(params, config, wav, window_seconds=0.4, context_seconds=0.2)
    err = _max_err(windowed, full)
    print(f"windowed vs single pass, no attention, context 10 frames: {err:.2e}")
    assert err <= 1e-5
    batched = hb.hubert_features(params, config, wav, window_seconds=0.4, context_seconds=0.2,
                                 batch_size=3)
    assert _max_err(batched, windowed) <= 1e-5
    short = hb.hubert_features(params, config, wav, window_seconds=0.4, context_seconds=0.1)
    assert _max_err(short, full) > 1e-3                 # 5 frames < 8: seams appear
    assert hb.window_plan(150, 20, 10)[-2:] == [(100, 110, 130), (110, 130, 150)]


def test_window_plan_tiles_with_context():
    for frames in (1, 39, 40, 41, 150, 1001):
        for core, context in ((20, 10), (7, 0), (1000, 100)):
            plan = hb.window_plan(frames, core, context)
            span = min(frames, core + 2 * context)
            assert plan[0][1] == 0 and plan[-1][2] == frames
            for (start, lo, hi), nxt in zip(plan, plan[1:] + [None]):
                assert 0 <= start and start + span <= frames and lo < hi
                assert lo - start >= min(context, lo) and start + span - hi >= min(
                    context, frames - hi)
                if nxt is not None:
                    assert nxt[1] == hi


def test_windowed_vs_full_context_with_attention(hf, speech_dir):
    """With attention (global) windowed output only approximates full context. Measured
    on a tiny random model of the equivalence test (hubert-large layout) on 6 s of speech,
    1 s windows; random attention is diffuse, so this says little about trained HuBERT."""
    wav = _speech(speech_dir, 6.0)
    for variant in (VARIANTS[2],):
        _, config, params = _tiny(hf, variant, seed=3)
        full = hb.hubert_features(params, config, wav, window_seconds=None)
        scale = float(np.sqrt(np.mean(full ** 2)))
        for context in (0.0, 0.5):
            win = hb.hubert_features(params, config, wav, window_seconds=1.0,
                                     context_seconds=context)
            rel = float(np.sqrt(np.mean((win - full) ** 2))) / scale
            print(f"windowed vs full {_ids(variant)} window 1 s context {context} s: "
                  f"max abs {_max_err(win, full):.3f}, relative rms {rel:.4f}")
            assert np.all(np.isfinite(win)) and rel < 0.5
        same = hb.hubert_features(params, config, wav, window_seconds=5.0, context_seconds=0.5)
        assert _max_err(same, full) <= 1e-4     # one window covers the clip: single pass


# --------------------------------------------------------------------------- loading

def test_load_hubert_round_trip(hf, tmp_path):
    torch, transformers = hf
    model, config, params = _tiny(hf, VARIANTS[2], seed=4)
    model.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "model.safetensors").is_file()
    loaded, loaded_config = hb.load_hubert(tmp_path / "model")
    assert loaded_config == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)

    # PyTorch .bin fallback of a HubertForCTC (weights under `hubert.`)
    ctc = transformers.HubertForCTC(model.config)
    ctc.hubert.load_state_dict(model.state_dict())
    (tmp_path / "ctc").mkdir()
    torch.save(ctc.state_dict(), tmp_path / "ctc" / "pytorch_model.bin")
    (tmp_path / "ctc" / "config.json").write_text(json.dumps(ctc.config.to_dict()))
    loaded_bin, _ = hb.load_hubert(tmp_path / "ctc")
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded_bin, params)

    wav = np.random.default_rng(4).normal(size=9000).astype(np.float32)
    x, _ = hb.aligned_input(config, wav)
    with torch.no_grad():
        ref = model(torch.from_numpy(x[None])).last_hidden_state.numpy()[0]
    out = hb.hubert_features(loaded, loaded_config, wav, window_seconds=None)
    err = _max_err(out, ref)
    print(f"hubert_features vs transformers on the aligned input: {err:.2e}")
    assert err <= ATOL


def test_checkpoint_errors(hf, tmp_path):
    from safetensors.numpy import load_file, save_file
    model, _, _ = _tiny(hf, VARIANTS[2], seed=5)
    good = tmp_path / "good"
    model.save_pretrained(good)

    with pytest.raises(CheckpointError, match="does not exist"):
        hb.load_hubert(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a directory"):
        hb.load_hubert(good / "config.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=f"{empty}: no config.json"):
        hb.load_hubert(empty)
    (empty / "config.json").write_text((good / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no weights found"):
        hb.load_hubert(empty)
    (empty / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: cannot read"):
        hb.load_hubert(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="model_type 'bert'"):
        hb.load_hubert(empty)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((good / "config.json").read_text())
    state = load_file(str(good / "model.safetensors"))
    del state["encoder.layers.0.attention.q_proj.weight"]
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*"
                                              r"encoder\.layers\.0\.attention\.q_proj\.weight"):
        hb.load_hubert(broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read the weights"):
        hb.load_hubert(broken)
