"""Stage 1, audio -> motion: `train_audio2motion --config=PRESET [--model=vae|regression]`.

paper: GeneFace's VAEModel (WaveNet hidden 256, 8 encoder / 4 decoder layers, 16-d latent
  at 1/4 frame rate, flow prior of 4 coupling layers), Adam 5e-4 with 1000 warm-up steps,
  x0.1 per 250k steps, clipping at global norm 1; 40k steps of 32 crops of 100 frames.
  Losses L2 1 + L1 1 + continuity 3 + KL 0.5 + sync 0.01; GeneFace's own weights are
  `--config.loss.lambda_l1=0 --config.loss.lambda_kl=0.4 --config.loss.continuity=geneface`
  (docs/geneface_differences.md).
cpu: hidden 128, 4 encoder / 3 decoder layers, flow hidden 32 with 3 layers per coupling;
  2500 steps of 16 crops, warm-up 200 (docs/stage1_audio2motion.md's runs).
tiny: the cpu width with 2 encoder / 2 decoder layers and a 2-coupling flow of width 16,
  Adam 1e-3 with 20 warm-up steps; 60 steps of 8 crops of 48 frames (smoke runs, tests:
  the validation L2 falls to ~0.3 of its start on tests/test_stage1_cli.py's corpus).

`model.kind`: vae (the FVAE with its flow prior) or regression (the same decoder fed no
latent: the mean-face baseline); the `--model` flag sets it. The audio feature width and
the motion width come from the corpus. The sync loss is on only with `--syncnet`.
"""

import ml_collections

from experiments.configs import check_preset


def get_config(preset="paper"):
    preset = check_preset(preset, "audio2motion")
    c = ml_collections.ConfigDict()
    c.seed = 0
    # geneface_jax.motion.vae.Audio2MotionConfig's fields (kind -> use_latent); conv_algorithm:
    # how the encoder/decoder WaveNets' K-tap convs are computed (same parameters, same
    # function): auto = Winograd F(4, K) on CPU, direct (lax.conv) elsewhere
    c.model = dict(kind="vae", cond_dim=64, hidden=256, latent=16, kernel_size=5,
                   enc_layers=8, dec_layers=4, stride=4, flow_hidden=64, flow_kernel=3,
                   flow_layers=4, num_flows=4, use_prior_flow=True, dropout=0.0,
                   conv_algorithm="auto")
    c.optim = dict(lr=5e-4, warmup=1000, decay_rate=0.1, decay_steps=250_000, clip_norm=1.0)
    # continuity: pairs (mean over valid consecutive-frame pairs) or geneface (the first
    # frame's error added, divided by frames x D); sync_hop: frames between sync windows
    c.loss = dict(lambda_l2=1.0, lambda_l1=1.0, lambda_kl=0.5, lambda_continuity=3.0,
                  continuity="pairs", lambda_sync=0.01, sync_hop=2)
    c.batch_size = 32                  # crops per step, split over devices
    c.window = 100                     # crop length in frames (a multiple of 4)
    # eval_every: validation losses on the valid split (0: only at the start and the end)
    c.run = dict(steps=40_000, log_every=50, checkpoint_every=500, eval_every=1000)
    if preset == "cpu":
        c.model.update(hidden=128, enc_layers=4, dec_layers=3, flow_hidden=32, flow_layers=3)
        c.optim.warmup = 200
        c.batch_size = 16
        c.run.steps = 2500
    if preset == "tiny":
        # width 128 as cpu (narrower ones learn too slowly for the tests' 60 steps),
        # shallower, and a small flow
        c.model.update(hidden=128, enc_layers=2, dec_layers=2, flow_hidden=16, flow_layers=2,
                       num_flows=2)
        c.optim.update(lr=1e-3, warmup=20)
        c.batch_size, c.window = 8, 48
        c.run.update(steps=60, log_every=20, checkpoint_every=20, eval_every=0)
    return c
