"""The paper's statistical latency table, end to end, plus real-time checks (listening and speaking).

What it does:

1. Builds random params of ``configs/freeze_omni.py:qwen2_0_5b``: the released speech encoder
   (1024 x 24), adapter, speech decoder (896 wide, pre-network + shared + prefix stacks) and TiCodec
   (24 kHz, 40 tokens/s) around a Qwen2-0.5B-shaped LLM (24 layers, 896 wide, vocab 151,936), in
   ``--dtype`` (LLM; the speech parts stay float32), with the real Qwen2 tokenizer.
2. Runs ``fo_jax.inference.pipeline`` with the release's ``server.json`` settings, except two that
   random weights would turn into content artefacts: the vocoder's quiet-point thresholds are
   raised so every window leaves as a packet (a random codec makes no quiet stretches; what is
   timed is the codec run, as in the paper's "first speech-token chunk -> first PCM chunk"), and
   codec tokens per segment are capped (``--speech-tokens``: a random decoder never emits its end).
3. For each of ``--questions`` questions: a fresh conversation (warm: nothing compiles) listens to
   ``--seconds`` of speech-like noise chunk by chunk (forced mode, as the release's offline script),
   then answers with a fixed English answer (``respond(force_tokens=...)``: the LLM runs every step
   and its hidden states drive the speech decoder; the text gives realistic segment boundaries,
   which random sampling would not). The answer is played out (iterated) to the end.

Reported over the questions: avg / p50 / p90 of the paper's four stages (from the speak decision:
first text segment ready -> decoder prefill done -> first window of codec tokens ready -> first PCM
packet out) and their total; listening ms per 160 ms chunk (keeps up if below 160); speaking
real-time factor (production time / audio duration; keeps up if below 1); compile counts.

Usage:
  .venv/bin/python benchmarks/latency.py [--questions 20] [--seconds 3] [--dtype float32] [--json OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

import flax.linen as nn
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fo_jax.audio.fbank import CHUNK_SAMPLES  # noqa: E402
from fo_jax.config import load_config, model_config  # noqa: E402
from fo_jax.inference.bundle import Bundle, ServerSettings  # noqa: E402
from fo_jax.inference.pipeline import LATENCY_EVENTS, Conversation, Engine, EngineOptions  # noqa: E402
from fo_jax.inference.sampling import SamplingConfig  # noqa: E402
from fo_jax.models import audio_llm, codec, speech_decoder  # noqa: E402
from fo_jax.models.configs import ModelConfig  # noqa: E402
from fo_jax.runtime import enable_compilation_cache  # noqa: E402
from fo_jax.testing.speech import speech_like_noise  # noqa: E402
from fo_jax.text.tokenizer import qwen2_tokenizer  # noqa: E402

PAPER_MS = {"llm_interrupted_to_first_text_chunk": (478, 468, 750), "first_text_chunk_to_decoder_prefill": (15, 15, 17),
            "decoder_prefill_to_first_speech_chunk": (237, 235, 252),
            "first_speech_chunk_to_first_pcm": (11, 11, 13), "total": (745, 753, 1020)}
ANSWERS = [
    "The capital of France is Paris. It is known for the Eiffel Tower.",
    "Sure, I can help with that. Water boils at one hundred degrees Celsius at sea level.",
    "A week has seven days. The weekend is Saturday and Sunday.",
    "Hello! I am doing well, thank you for asking. How can I help you today?",
    "The sun is a star. It is about one hundred and fifty million kilometres away.",
    "Yes, cats are mammals. They usually sleep for many hours a day.",
    "Mount Everest is the highest mountain on Earth, at almost nine thousand metres.",
    "Two plus three is five. Five plus five is ten.",
    "You could try reading a book, going for a walk, or calling a friend.",
    "The Pacific is the largest ocean. It covers about a third of the planet.",
]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def random_bundle(cfg: ModelConfig, seed: int = 0) -> Bundle:
    """Random params of every part (codec: the decoding side, weight norm folded)."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    audio = jax.jit(lambda k: nn.unbox(audio_llm.init_params(cfg, k)))(k1)
    dec = nn.unbox(speech_decoder.init_params(cfg.decoder, k2))
    cod = codec.fold_weight_norm(nn.unbox(codec.init_variables(cfg.codec, k3))["params"])
    cod = {k: cod[k] for k in ("generator", "quantizer")}
    server = ServerSettings(decoder_seg_threshold_first_pack=1e9, decoder_seg_threshold=1e9)
    return Bundle(cfg, {"audiollm": audio, "decoder": dec, "codec": cod}, server, None, None, "native")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=3.0, help="question length")
    ap.add_argument("--speech-tokens", type=int, default=80, help="codec tokens per segment (2 s of audio)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="LLM dtype")
    ap.add_argument("--max-len", type=int, default=1024, help="LLM KV-cache slots per conversation")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. --set model.encoder.num_layers=2 (smaller dry runs)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    enable_compilation_cache()
    base = model_config(load_config("configs/freeze_omni.py:qwen2_0_5b", args.overrides))
    cfg = dataclasses.replace(base, llm=dataclasses.replace(base.llm, dtype=args.dtype, param_dtype=args.dtype))
    load = [os.getloadavg()[0]]
    started = time.perf_counter()
    log("building random params ...")
    bundle = random_bundle(cfg)
    tok = qwen2_tokenizer()
    engine = Engine(bundle, EngineOptions(sampling=SamplingConfig(top_k=1), max_speech_tokens=args.speech_tokens), tok)
    del bundle
    build_s = time.perf_counter() - started
    log(f"built in {build_s:.0f} s; compiling ...")
    started = time.perf_counter()
    warm = engine.warm_up(args.max_len)
    warm_s = time.perf_counter() - started
    log(f"warm-up: {warm} programs in {warm_s:.0f} s")
    compiled = engine.compiles.count

    stages = {k: [] for k in PAPER_MS}
    chunk_ms, first_chunk_ms, rtf, audio_s = [], [], [], []
    for i in range(args.questions):
        conv = Conversation(engine, max_len=args.max_len, seed=i)
        wave = speech_like_noise(args.seconds, i)
        for start in range(0, len(wave) - CHUNK_SAMPLES + 1, CHUNK_SAMPLES):
            t = time.perf_counter()
            conv.listen(wave[start:start + CHUNK_SAMPLES], decide=False)
            (first_chunk_ms if start == 0 else chunk_ms).append((time.perf_counter() - t) * 1e3)
        ids = tok.encode(ANSWERS[i % len(ANSWERS)], add_special_tokens=False)
        reply = conv.respond(force_tokens=ids)
        for _ in reply:  # played out
            pass
        lat = reply.latency_ms()
        for k in stages:
            stages[k].append(lat[k])
        rtf.append(reply.busy_seconds / reply.audio_seconds)
        audio_s.append(reply.audio_seconds)
        load.append(os.getloadavg()[0])
        log(f"[{i + 1}/{args.questions}] total {lat['total']:.0f} ms, segments {len(reply.segments)}, "
            f"audio {reply.audio_seconds:.1f} s, speak RTF {rtf[-1]:.2f}, chunk {statistics.median(chunk_ms):.0f} ms")

    table = {k: {"avg": statistics.fmean(v), "p50": pct(v, 50), "p90": pct(v, 90)} for k, v in stages.items()}
    results = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
                    "backend": jax.default_backend(), "load_1min": [min(load), max(load)]},
        "settings": {**vars(args), "llm": "qwen2_0_5b", "events": LATENCY_EVENTS},
        "latency_ms": table,
        "listen_ms_per_chunk": {"steady_p50": pct(chunk_ms, 50), "steady_p90": pct(chunk_ms, 90),
                                "turn_first_p50": pct(first_chunk_ms, 50), "budget": 160.0},
        "speak_rtf": {"p50": pct(rtf, 50), "max": max(rtf)}, "answer_audio_s": statistics.fmean(audio_s),
        "compiles": {"warm_up": warm, "after_warm_up": engine.compiles.count - compiled},
        "seconds": {"build": build_s, "warm_up": warm_s},
    }
    print(f"\nLatency (ms) over {args.questions} questions, {jax.default_backend()}, LLM {args.dtype}, "
          f"load {min(load):.1f}-{max(load):.1f}")
    print(f"| {'stage':<40} | {'avg':>7} | {'p50':>7} | {'p90':>7} | paper avg / p50 / p90 |")
    print(f"|{'-' * 42}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 23}|")
    for k, row in table.items():
        paper = " / ".join(str(v) for v in PAPER_MS[k])
        print(f"| {k:<40} | {row['avg']:7.0f} | {row['p50']:7.0f} | {row['p90']:7.0f} | {paper:<21} |")
    lm = results["listen_ms_per_chunk"]
    print(f"listening: {lm['steady_p50']:.0f} ms per 160 ms chunk (p90 {lm['steady_p90']:.0f}, turn's first chunk "
          f"{lm['turn_first_p50']:.0f}): {'keeps up' if lm['steady_p90'] < 160 else 'slower than real time'}")
    sr = results["speak_rtf"]
    print(f"speaking: RTF p50 {sr['p50']:.2f}, max {sr['max']:.2f}: "
          f"{'faster than it plays' if sr['max'] < 1 else 'slower than it plays'}")
    print(f"compiles after warm-up: {results['compiles']['after_warm_up']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
