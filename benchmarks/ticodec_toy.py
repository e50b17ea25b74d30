"""TiCodec trained for a few minutes on the toy world's assistant voice: is its round trip intelligible?

What it does:

1. Builds the codec of a run config (default ``configs/freeze_omni.py:tiny``: the real token
   rate and codebook, narrow convs) with random weights.
2. Trains it as a GAN on random crops of the toy world's assistant clips (``speech_out.jsonl`` of
   a built world): HiFi-GAN's multi-period and multi-scale discriminators (LSGAN), the generator
   objective of ``fo_jax.training.codec_losses`` (mel L1 x45, VQ x10, adversarial, feature
   matching; not the global-consistency term, which needs a second clip per example), AdamW 2e-4
   with betas (0.8, 0.99). The adversarial terms are needed from the first step: a freshly
   initialised generator's output (RMS ~1e-10 for the tiny config) lies under the log-mel floor,
   where the mel loss has no gradient. Stops after ``--cpu_minutes`` of process CPU time
   (on 2 quiet cores, half to all of that in wall time; fair on a shared machine) or
   ``--steps``.
3. Measures the round trip of the held-out answers with the toy's recognizer
   (``fo_jax.toy.codec.roundtrip_intelligibility``: pocketsphinx + the world's bigram LM, WER and
   whole-answer accuracy, next to the reference TTS audio), decoding with the most common global
   tokens of the training clips (the release decodes with fixed global tokens too).

Usage (after ``fo-jax toy`` built the data):
  .venv/bin/python benchmarks/ticodec_toy.py --data work/toy/data [--cpu_minutes 8] [--json OUT]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fo_jax.config import load_config, model_config
from fo_jax.models import codec as ticodec
from fo_jax.models.configs import CodecConfig
from fo_jax.models.discriminators import MultiPeriodDiscriminator, MultiScaleDiscriminator
from fo_jax.runtime import enable_compilation_cache
from fo_jax.toy.codec import load_clips, roundtrip_intelligibility
from fo_jax.toy.synth import world_lm
from fo_jax.training.codec_losses import (discriminator_loss, feature_loss, generator_loss, generator_objective,
                                          mel_l1_loss)
from fo_jax.training.optim import OptimizerConfig, make_optimizer


class TiCodecRoundTrip:
    """A trained TiCodec as the toy's codec interface (encode/decode at 24 kHz, fixed global tokens).

    Inputs are padded to whole seconds (40 tokens) so that clips of any length reuse a few compiled
    shapes; the padding is cut from the outputs.
    """

    BUCKET = 40  # tokens

    def __init__(self, config: CodecConfig, variables: dict, global_tokens: np.ndarray):
        self.config, self.variables, self.global_tokens = config, variables, global_tokens[None]
        self.sample_rate, self.vocab_size = config.sample_rate, config.n_codes
        self.token_rate = config.sample_rate // config.samples_per_token

    def _padded(self, n_tokens: int) -> int:
        return -(-n_tokens // self.BUCKET) * self.BUCKET

    def encode(self, wav: np.ndarray) -> np.ndarray:
        n = len(wav) // self.config.samples_per_token
        padded = np.zeros(self._padded(n) * self.config.samples_per_token, np.float32)
        padded[:n * self.config.samples_per_token] = wav[:n * self.config.samples_per_token]
        return np.asarray(ticodec.encode(self.config, self.variables, padded)[0][0])[:n]

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        padded = np.full(self._padded(len(tokens)), tokens[-1], np.int32)
        padded[:len(tokens)] = tokens
        wav = ticodec.decode(self.config, self.variables["params"], padded, self.global_tokens)[0]
        return np.asarray(wav)[:len(tokens) * self.config.samples_per_token]


def crops(clips: list[np.ndarray], size: int, batch: int, rng: np.random.Generator) -> np.ndarray:
    """(batch, size) random crops of clips at least ``size`` long."""
    long = [c for c in clips if len(c) >= size]
    out = np.zeros((batch, size), np.float32)
    for i in range(batch):
        clip = long[rng.integers(len(long))]
        start = rng.integers(len(clip) - size + 1)
        out[i] = clip[start:start + size]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a built toy world's data folder (WORKDIR/data)")
    p.add_argument("--config", default="configs/freeze_omni.py:tiny")
    p.add_argument("--cpu_minutes", type=float, default=8.0, help="training budget in process CPU minutes")
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop_tokens", type=int, default=20, help="crop length in tokens (600 samples each)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    enable_compilation_cache()

    config = model_config(load_config(args.config)).codec
    manifests = Path(args.data) / "manifests"
    clips = load_clips(manifests / "speech_out.jsonl", rate=config.sample_rate)
    variables = nn.unbox(ticodec.init_variables(config, jax.random.key(0)))
    params, batch_stats = variables["params"], variables["batch_stats"]
    size = args.crop_tokens * config.samples_per_token
    discriminators = {"mpd": MultiPeriodDiscriminator(), "msd": MultiScaleDiscriminator()}
    d_vars = {k: nn.unbox(jax.jit(functools.partial(d.init, train=False))(jax.random.key(i + 1),
                                                                            jnp.zeros((1, size), jnp.float32)))
              for i, (k, d) in enumerate(discriminators.items())}
    d_params = {k: v["params"] for k, v in d_vars.items()}
    d_stats = {k: v.get("batch_stats", {}) for k, v in d_vars.items()}
    # HiFi-GAN / TiCodec: AdamW lr 2e-4, betas (0.8, 0.99), for generator and discriminators alike.
    optimizer = make_optimizer(OptimizerConfig(lr=args.lr, schedule="constant", warmup_steps=0, b1=0.8, b2=0.99,
                                               weight_decay=0.01, clip_norm=1e9))
    opt_state, d_opt_state = optimizer.init(params), optimizer.init(d_params)

    def discriminate(dp, ds, wav, train):
        """{name: (logits, feature maps)} of both discriminators; updated spectral-norm stats when train."""
        outs, stats = {}, {}
        for k, d in discriminators.items():
            variables = {"params": dp[k], **({"batch_stats": ds[k]} if ds[k] else {})}
            if train and ds[k]:
                outs[k], mutated = d.apply(variables, wav, True, mutable=["batch_stats"])
                stats[k] = mutated["batch_stats"]
            else:
                outs[k], stats[k] = d.apply(variables, wav, False), ds[k]
        return outs, stats

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def generator_step(params, batch_stats, opt_state, d_params, d_stats, wav):
        def loss_fn(p):
            out, mutated = ticodec.Codec(config).apply({"params": p, "batch_stats": batch_stats}, wav, train=True,
                                                        mutable=["batch_stats"])
            real, _ = discriminate(d_params, d_stats, wav, False)
            fake, _ = discriminate(d_params, d_stats, out.wav_bs, False)
            terms = {"mel": mel_l1_loss(config, wav, out.wav_bs), "vq": out.quantizer.loss,
                     "adv": sum(generator_loss(fake[k][0])[0] for k in fake),
                     "fm": sum(feature_loss(real[k][1], fake[k][1]) for k in fake)}
            return generator_objective(terms), (terms, mutated["batch_stats"], out.wav_bs)

        (loss, (terms, stats, fake_wav)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, fake_wav, {"g_loss": loss, **terms}

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def discriminator_step(d_params, d_stats, d_opt_state, wav, fake_wav):
        def loss_fn(dp):
            real, stats = discriminate(dp, d_stats, wav, True)
            fake, _ = discriminate(dp, stats, jax.lax.stop_gradient(fake_wav), False)
            return sum(discriminator_loss(real[k][0], fake[k][0])[0] for k in real), stats

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(d_params)
        updates, d_opt_state = optimizer.update(grads, d_opt_state, d_params)
        return optax.apply_updates(d_params, updates), stats, d_opt_state, loss

    rng = np.random.default_rng(0)
    started, cpu0 = time.perf_counter(), time.process_time()
    history, n = [], 0
    while n < args.steps and time.process_time() - cpu0 < 60 * args.cpu_minutes:
        wav = jnp.asarray(crops(clips, size, args.batch, rng))
        params, batch_stats, opt_state, fake, metrics = generator_step(params, batch_stats, opt_state, d_params,
                                                                       d_stats, wav)
        d_params, d_stats, d_opt_state, metrics["d_loss"] = discriminator_step(d_params, d_stats, d_opt_state,
                                                                                wav, fake)
        n += 1
        if n % 10 == 0:
            history.append({"step": n, **{k: float(v) for k, v in metrics.items()}})
            print(json.dumps(history[-1]), flush=True)
    train_s, train_cpu = time.perf_counter() - started, time.process_time() - cpu0
    variables = {"params": params, "batch_stats": batch_stats}

    # The most common global token per position over the training clips' first seconds (one
    # compiled shape): the fixed inference voice.
    second = config.sample_rate
    globals_ = np.stack([np.asarray(ticodec.encode(config, variables, c[:second])[1][0])
                         for c in clips if len(c) >= second][:32])
    fixed = np.array([np.bincount(col).argmax() for col in globals_.T], np.int32)
    codec = TiCodecRoundTrip(config, variables, fixed)
    with tempfile.TemporaryDirectory() as tmp:
        lm = world_lm(os.path.join(tmp, "world.arpa"))
        ev = roundtrip_intelligibility(codec, manifests / "test_qa.jsonl", lm,
                                       wav_dir=Path(args.json).with_suffix("") if args.json else None)
    result = {"config": args.config, "steps": n, "batch": args.batch, "crop_tokens": args.crop_tokens,
              "train_seconds": round(train_s, 1), "train_cpu_seconds": round(train_cpu, 1),
              "load_average_1min": round(os.getloadavg()[0], 2), "final": history[-1] if history else {},
              "intelligibility": ev}
    print(json.dumps({k: v for k, v in result.items() if k != "intelligibility"}))
    print(f"reference TTS: WER {ev['reference']['wer']:.3f}, answers recognized {ev['reference']['accuracy']:.3f}; "
          f"TiCodec round trip: WER {ev['roundtrip']['wer']:.3f}, answers recognized {ev['roundtrip']['accuracy']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "history": history}, indent=2) + "\n")


if __name__ == "__main__":
    main()
