"""``fo-jax infer``: a spoken question in a file -> the spoken answer (the release's ``bin/inference.py``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("infer", help="answer a spoken question (speech in, speech out) from an audio file")
    p.add_argument("--model_path", required=True,
                   help="model bundle: the release's checkpoints directory or a fo_jax bundle")
    p.add_argument("--llm_path", default=None, help="HF Qwen2 directory (default: MODEL_PATH/llm)")
    p.add_argument("--input_wav", required=True, help="question audio: WAV/FLAC/..., any rate, mono or stereo")
    p.add_argument("--output_wav", required=True, help="answer audio (24 kHz, 16-bit WAV)")
    p.add_argument("--top_k", type=int, default=5, help="LLM top-k (1 = greedy)")
    p.add_argument("--top_p", type=float, default=0.8)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--decoder_top_k", type=int, default=None, help="speech-decoder top-k (default: server.json's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=["forced", "duplex"], default="forced",
                   help="forced: the whole input is the question; duplex: the state head decides")
    p.add_argument("--system_role", default="You are a helpful assistant.", help="system prompt")
    p.add_argument("--max_answer_tokens", type=int, default=500)
    p.add_argument("--max_segment_tokens", type=int, default=64, help="cut text segments after this many tokens")
    p.add_argument("--max_speech_tokens", type=int, default=None,
                   help="codec tokens per segment (default: the decoder's 1000)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="LLM dtype")
    p.add_argument("--report", default=None, help="write a JSON report here")
    p.add_argument("--cache_dir", default=None, help="converted-params cache (official layout)")
    p.add_argument("--no_cache", action="store_true", help="convert official checkpoints without caching")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def _log(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from fo_jax.audio.io import audio_info, write_wav
    from fo_jax.errors import FoJaxError
    from fo_jax.inference.bundle import load_bundle
    from fo_jax.inference.offline import infer_file
    from fo_jax.inference.pipeline import Engine, EngineOptions
    from fo_jax.inference.sampling import SamplingConfig

    try:
        options = EngineOptions(sampling=SamplingConfig(temperature=args.temperature, top_k=args.top_k,
                                                        top_p=args.top_p),
                                decoder_top_k=args.decoder_top_k, max_answer_tokens=args.max_answer_tokens,
                                max_segment_tokens=args.max_segment_tokens, max_speech_tokens=args.max_speech_tokens)
    except ValueError as e:
        raise FoJaxError(str(e)) from None
    for flag, path in (("--output_wav", args.output_wav), ("--report", args.report)):
        if path and not Path(path).resolve().parent.is_dir():
            raise FoJaxError(f"{flag}: directory {Path(path).resolve().parent} does not exist")
    frames, rate, channels = audio_info(args.input_wav)  # bad input fails before the model loads
    notes = ([f"resampling {rate} Hz to 16 kHz"] if rate != 16000 else []) + (
        [f"averaging {channels} channels"] if channels > 1 else [])
    _log(args, f"input: {frames / rate:.2f} s" + "".join(f"; {n}" for n in notes))

    started = time.perf_counter()
    bundle = load_bundle(args.model_path, args.llm_path, dtype=args.dtype, cache_dir=args.cache_dir,
                         use_cache=not args.no_cache)
    load_seconds = time.perf_counter() - started
    _log(args, f"loaded the {bundle.layout} bundle in {load_seconds:.1f} s"
         + (" (converted and cached)" if bundle.converted and not args.no_cache else ""))
    engine = Engine(bundle, options)
    del bundle
    _log(args, "compiling ...")
    audio, report = infer_file(engine, args.input_wav, mode=args.mode, system_role=args.system_role,
                               seed=args.seed, progress=not args.quiet)
    try:
        write_wav(args.output_wav, audio, engine.vocoder.sample_rate)
    except (OSError, RuntimeError) as e:
        raise FoJaxError(f"cannot write {args.output_wav}: {e}") from None
    report["output"]["path"] = os.fspath(args.output_wav)
    report["settings"] = {k: getattr(args, k) for k in ("top_k", "top_p", "temperature", "decoder_top_k", "seed",
                                                         "mode", "system_role", "max_answer_tokens",
                                                         "max_segment_tokens", "max_speech_tokens", "dtype")}
    report["settings"]["decoder_top_k"] = engine.decoder_sampling.top_k
    report["seconds"]["load"] = load_seconds
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=1, ensure_ascii=False))
    if not report["turns"]:
        _log(args, "no answer: the state head never chose to speak (the output is empty)")
    latency = report["latency_ms"]
    if latency:
        _log(args, "latency ms: " + ", ".join(f"{k} {v:.0f}" for k, v in latency.items() if not k.startswith("at_")))
    print(report["text"])
    return 0
