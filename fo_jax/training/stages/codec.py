"""Stage ``codec`` (speech-out stage 1): TiCodec GAN training, as HiFi-GAN / TiCodec train it.

Param tree (``*_batch_stats`` are running statistics, updated by the forward, not by gradients)::

  {'codec': encoder + quantizer + generator, 'codec_batch_stats': the global encoder's BatchNorm,
   'mpd': multi-period discriminator, 'msd': multi-scale discriminator,
   'msd_batch_stats': the spectral-norm power-iteration vectors of its first scale}

Each step, on fixed-shape random crops of ``segment_size`` samples (plus a second crop of the same
utterance for TiCodec's global-feature consistency): one generator forward; the discriminators
update on (real, detached fake) with the LSGAN loss; then the generator updates against the
*updated* discriminators with mel L1 x45 + adversarial + feature matching + VQ x10 + global x5.
The generator forward runs once: its VJP is taken before the discriminator update and pulled back
through after it. Two AdamW optimizers (generator, discriminators) of the same settings; their
states are checkpointed together as ``{'generator', 'discriminator'}``.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fo_jax.audio.io import load_audio
from fo_jax.config import model_config
from fo_jax.conversion.official_codec import load_official_codec
from fo_jax.data.codec_tokens import SpeechCodec, TiCodecTokens
from fo_jax.data.manifest import read_manifest, resolve
from fo_jax.data.prepare import check_audio
from fo_jax.data.speech import bucketed_dataset, plan_batches
from fo_jax.errors import ConfigError, LoadError
from fo_jax.models import codec as ticodec
from fo_jax.models.configs import CodecConfig
from fo_jax.models.discriminators import MultiPeriodDiscriminator, MultiScaleDiscriminator
from fo_jax.models.mel_codec import MelVQCodec
from fo_jax.training import codec_losses as losses
from fo_jax.training.checkpoint import check_like, load_trained
from fo_jax.training.freeze import flatten, merge, unflatten
from fo_jax.training.optim import OptimizerConfig, make_optimizer
from fo_jax.training.step import StageStep

GENERATOR_KEYS = ("codec",)
DISCRIMINATOR_KEYS = ("mpd", "msd")


def _part(tree: dict, keys: tuple[str, ...]) -> dict:
    return {k: tree[k] for k in keys if k in tree}


def random_crop(wav: np.ndarray, segment: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``segment``-sample window of ``wav`` (zero-padded at the end when shorter)."""
    if len(wav) <= segment:
        return np.pad(wav, (0, segment - len(wav)))
    start = int(rng.integers(0, len(wav) - segment + 1))
    return wav[start:start + segment]


class CodecStage:
    def __init__(self, cfg):
        s = cfg.stage
        if not s.get("manifest"):
            raise ConfigError("stage.manifest is required (--set stage.manifest=PATH)")
        self.config: CodecConfig = model_config(cfg).codec
        self.segment = self.config.segment_size
        hop = self.config.samples_per_token
        if self.segment % hop or self.segment < self.config.n_fft:
            raise ConfigError(f"model.codec.segment_size={self.segment} must be a multiple of {hop} samples "
                              f"(one token) and at least n_fft={self.config.n_fft}")
        self.trainable = tuple(s.trainable)
        unknown = sorted(set(s.get("loss_weights", {})) - set(losses.GENERATOR_WEIGHTS))
        if unknown:
            raise ConfigError(f"stage.loss_weights: unknown term(s) {unknown}; "
                              f"expected {sorted(losses.GENERATOR_WEIGHTS)}")
        self.weights = dict(losses.GENERATOR_WEIGHTS) | dict(s.get("loss_weights", {}))
        self.peak_level = float(s.get("peak_level", 0.95))
        self.init_from = s.get("init_from", "")
        self.mpd = MultiPeriodDiscriminator(tuple(s.disc_periods), width_divisor=s.disc_width_divisor)
        self.msd = MultiScaleDiscriminator(width_divisor=s.disc_width_divisor)
        self.base = Path(s.manifest).resolve().parent
        report: list[str] = []
        self.records = read_manifest(s.manifest, required=["audio"], validate=check_audio,
                                     policy=s.get("manifest_policy", "skip"), report=report)
        self.rejected = report
        self.batch_size = s.batch_size
        # One planned batch per batch_size utterances: an epoch draws one crop from each (HiFi-GAN).
        self.batches, _ = plan_batches([1] * len(self.records), (1,), self.batch_size // jax.process_count(),
                                       cfg.get("seed", 0))
        if not self.batches:
            raise ConfigError(f"{s.manifest}: {len(self.records)} usable utterances, fewer than one batch "
                              f"of {self.batch_size}")

    # --- params -----------------------------------------------------------------------------------

    def init_boxed(self, rng: jax.Array) -> dict:
        k_codec, k_mpd, k_msd = jax.random.split(rng, 3)
        wav = jnp.zeros((1, self.segment), jnp.float32)
        codec = ticodec.init_variables(self.config, k_codec)
        mpd = jax.jit(self.mpd.init)(k_mpd, wav)
        msd = jax.jit(self.msd.init)(k_msd, wav)
        return {"codec": codec["params"], "codec_batch_stats": codec["batch_stats"], "mpd": mpd["params"],
                "msd": msd["params"], "msd_batch_stats": msd["batch_stats"]}

    def load_params(self, rng: jax.Array) -> dict:
        params = nn.unbox(self.init_boxed(rng))
        if self.init_from:
            params.update(_released_codec(self.init_from, params))
        return params

    # --- data -------------------------------------------------------------------------------------

    def _load(self, index: int) -> np.ndarray:
        wav, _ = load_audio(resolve(self.records[index]["audio"], self.base), self.config.sample_rate)
        peak = np.max(np.abs(wav))
        if self.peak_level > 0 and peak > 0:  # HiFi-GAN's loader: peak-normalise to 0.95
            wav = wav * (self.peak_level / peak)
        return wav.astype(np.float32)

    def make_batch(self, bucket: int, indices: list[int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """{'wav': (B, segment), 'wav2': (B, segment)}: two independent crops of each utterance."""
        wavs = [self._load(i) for i in indices]
        return {"wav": np.stack([random_crop(w, self.segment, rng) for w in wavs]),
                "wav2": np.stack([random_crop(w, self.segment, rng) for w in wavs])}

    def dataset(self, seed: int):
        return bucketed_dataset(self.batches, self.make_batch, seed)

    def make_step(self, optimizer_cfg: OptimizerConfig) -> StageStep:
        """Two AdamW optimizers; ``decay_steps`` 0 means one epoch of this stage's data."""
        if optimizer_cfg.schedule == "exponential" and optimizer_cfg.decay_steps <= 0:
            optimizer_cfg = dataclasses.replace(optimizer_cfg, decay_steps=len(self.batches))
        return gan_step(self.config, self.mpd, self.msd, tuple(sorted(self.weights.items())), optimizer_cfg)


def _discriminate(mpd: nn.Module, msd: nn.Module, params: dict, real: jax.Array, fake: jax.Array):
    """Both discriminators on [real; fake] in one batch. Returns ((real, fake) logits, (real, fake)
    feature maps) as lists over sub-discriminators, and the new spectral-norm vectors."""
    x = jnp.concatenate([real, fake], axis=0)
    b = real.shape[0]
    p_logits, p_fmaps = mpd.apply({"params": params["mpd"]}, x)
    (s_logits, s_fmaps), new = msd.apply({"params": params["msd"], "batch_stats": params["msd_batch_stats"]},
                                         x, True, mutable=["batch_stats"])
    logits, fmaps = p_logits + s_logits, p_fmaps + s_fmaps
    halves = lambda xs, i: [v[i * b:(i + 1) * b] for v in xs]
    return ((halves(logits, 0), halves(logits, 1)),
            ([halves(f, 0) for f in fmaps], [halves(f, 1) for f in fmaps]), new["batch_stats"])


@functools.lru_cache(maxsize=8)  # runs of one process (resume, tests) reuse the traced step
def gan_step(config: CodecConfig, mpd: nn.Module, msd: nn.Module, weights: tuple[tuple[str, float], ...],
             optimizer_cfg: OptimizerConfig) -> StageStep:
    """The HiFi-GAN / TiCodec update over the codec stage's param tree (see the module doc).

    batch: {'wav': (B, S), 'wav2': (B, S)} float32 crops. Metrics: the generator terms (mel, adv,
    fm, vq, global), ``loss`` (their weighted sum), ``disc_loss`` and both gradient norms.
    """
    opt = make_optimizer(optimizer_cfg)
    model = ticodec.Codec(config)
    sg = jax.lax.stop_gradient

    def init(trainable):
        return {"generator": opt.init(_part(trainable, GENERATOR_KEYS)),
                "discriminator": opt.init(_part(trainable, DISCRIMINATOR_KEYS))}

    def step(trainable, opt_state, frozen, batch, rng):
        frozen = jax.tree.map(sg, frozen)
        full = merge(trainable, frozen)
        wav, wav2 = batch["wav"], batch["wav2"]
        gen, disc = _part(trainable, GENERATOR_KEYS), _part(trainable, DISCRIMINATOR_KEYS)

        def generate(g):
            variables = {"params": merge(g, _part(frozen, GENERATOR_KEYS))["codec"],
                         "batch_stats": full["codec_batch_stats"]}
            out, new = model.apply(variables, wav, True, mutable=["batch_stats"])
            # TiCodec: the second clip's global vector (same utterance), a detached target.
            g2, new = model.apply({**variables, **new}, wav2, True, method=model.global_features,
                                  mutable=["batch_stats"])
            return (out.wav_bs, out.quantizer.loss, out.global_features_bd), (sg(g2), new["batch_stats"])

        # One generator forward; its VJP is pulled back after the discriminators have moved.
        (fake, vq, global_bd), pullback, (global2_bd, codec_stats) = jax.vjp(generate, gen, has_aux=True)

        def discriminators(d, spectral):
            return merge(d, _part(frozen, DISCRIMINATOR_KEYS), {"msd_batch_stats": spectral})

        def disc_objective(d):
            logits, _, spectral = _discriminate(mpd, msd, discriminators(d, full["msd_batch_stats"]), wav, sg(fake))
            return losses.discriminator_loss(*logits)[0], spectral

        (d_loss, spectral), d_grads = jax.value_and_grad(disc_objective, has_aux=True)(disc)
        d_updates, d_opt = opt.update(d_grads, opt_state["discriminator"], disc)
        disc = optax.apply_updates(disc, d_updates)

        def gen_objective(outputs):
            y_hat, vq_loss, g1 = outputs
            (_, fake_logits), (real_fmaps, fake_fmaps), new = _discriminate(
                mpd, msd, discriminators(disc, spectral), wav, y_hat)
            terms = {"mel": losses.mel_l1_loss(config, wav, y_hat),
                     "adv": losses.generator_loss(fake_logits)[0],
                     "fm": losses.feature_loss(real_fmaps, fake_fmaps), "vq": vq_loss,
                     "global": losses.global_consistency_loss(g1, global2_bd)}
            return losses.generator_objective(terms, dict(weights)), (terms, new)

        (g_loss, (terms, spectral)), cotangent = jax.value_and_grad(gen_objective, has_aux=True)(
            (fake, vq, global_bd))
        (g_grads,) = pullback(cotangent)
        g_updates, g_opt = opt.update(g_grads, opt_state["generator"], gen)
        gen = optax.apply_updates(gen, g_updates)

        # Running statistics are written back only where they train (frozen ones stay bitwise).
        stats = {"codec_batch_stats": codec_stats, "msd_batch_stats": spectral}
        trainable = merge(gen, disc, {k: v for k, v in stats.items() if k in trainable})
        metrics = dict(terms, loss=g_loss, disc_loss=d_loss, grad_norm=optax.tree.norm(g_grads),
                       disc_grad_norm=optax.tree.norm(d_grads))
        return trainable, {"generator": g_opt, "discriminator": d_opt}, metrics

    return StageStep(init, jax.jit(step, donate_argnums=(0, 1)))


def _released_codec(directory: str, like: dict) -> dict:
    """{'codec', 'codec_batch_stats'} of the release's codec directory (weight norm kept, to train)."""
    _, variables = load_official_codec(directory, fold=False)
    check_like(variables["params"], like["codec"], f"{directory} (vs model.codec)")
    return {"codec": jax.tree.map(jnp.asarray, variables["params"]),
            "codec_batch_stats": jax.tree.map(jnp.asarray, variables["batch_stats"])}


def _codec_of_run(params: dict, run_cfg: dict) -> tuple[CodecConfig, dict]:
    """The codec variables of a ``codec`` run: its trained leaves over, where it froze some, the
    ones it started from (the release's codec, or the random init of its seed, as ``load_params``)."""
    config = CodecConfig.from_dict(run_cfg["model"]["codec"])
    trained = flatten(_part(params, ("codec", "codec_batch_stats")))
    k_codec = jax.random.split(jax.random.key(run_cfg.get("seed", 0)), 3)[0]
    init = functools.partial(ticodec.init_variables, config)
    like = nn.unbox(jax.eval_shape(init, k_codec))
    start = {"codec": like["params"], "codec_batch_stats": like["batch_stats"]}
    if set(trained) != set(flatten(start)):
        start = nn.unbox(init(k_codec))
        start = {"codec": start["params"], "codec_batch_stats": start["batch_stats"]}
        if run_cfg["stage"].get("init_from"):
            start = _released_codec(run_cfg["stage"]["init_from"], start)
        trained = flatten(jax.device_get(start)) | trained  # numpy, as loaded: folded on the host
    tree = unflatten(trained)
    return config, {"params": ticodec.fold_weight_norm(tree["codec"]), "batch_stats": tree["codec_batch_stats"]}


def load_speech_codec(source: str | Path) -> SpeechCodec:
    """A ``SpeechCodec`` from a ``codec`` training run directory, the release's codec directory
    (``model.json`` + ``final.pt``) or a saved fast mel codec (``codec.json``, the toy world's)."""
    path = Path(source)
    if (path / "codec.json").is_file():
        return MelVQCodec.load(path)
    if (path / "checkpoints").is_dir():
        params, meta = load_trained(path)
        run_cfg = meta.get("config", {})
        if run_cfg.get("stage", {}).get("name") != "codec":
            raise LoadError(f"{path}: not a codec training run (stage {run_cfg.get('stage', {}).get('name')!r})")
        return TiCodecTokens(*_codec_of_run(params, run_cfg))
    if (path / "model.json").is_file():
        config, variables = load_official_codec(path)
        return TiCodecTokens(config, variables)
    raise LoadError(f"{path}: neither a codec training run (checkpoints/) nor a codec directory "
                    "(model.json or codec.json)")


def build(cfg) -> CodecStage:
    return CodecStage(cfg)
