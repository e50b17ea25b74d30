# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 — The toy world: a small Freeze-Omni trained end to end, then talked to
#
# Freeze-Omni's claim is that a *frozen* text LLM gains speech in and speech out without losing
# what it knows. `fo-jax toy` checks the claim at a size a CPU trains in minutes:
#
# 1. a closed world of spoken Q&A (arithmetic, capitals, colours, opposites, counting), user speech
#    synthesized offline with several voices, speeds and pitches; held-out test questions;
# 2. a tiny Qwen2 text LLM trained on the world's text, then **frozen** (its fingerprint recorded);
# 3. the paper's training stages with the real stage code and configs (`toy` presets): speech in
#    1 (CTC), 2 (encoder + adapter into the frozen LLM), 3 (prompt embeddings + state head);
#    speech out 2 (NAR/AR decoder on codec tokens) and 3 (prefix decoder), with a fast mel codec;
#    TiCodec is trained on the side and measured;
# 4. the trained model saved as a native bundle, evaluated through the streaming pipeline, and
#    talked to in duplex mode (the state head decides when to answer).
#
# This notebook runs the same pipeline as `fo-jax toy --quick` (or reuses a finished run in the same
# folder: every step is cached), then looks at what came out. Set `FO_JAX_TOY_WORKDIR` to point it at
# another run (e.g. `work/toy` after `fo-jax toy`) and `FO_JAX_TOY_FULL=1` for the full world.

# %%
import json
import os
from pathlib import Path

import numpy as np
from IPython.display import Audio, Image, Markdown, display

from fo_jax.toy import pipeline
from fo_jax.toy.report import RunInfo, evaluate_targets, write_report
from fo_jax.toy.steps import StepContext, run_steps, summary_table

QUICK = os.environ.get("FO_JAX_TOY_FULL", "") != "1"
WORKDIR = Path(os.environ.get("FO_JAX_TOY_WORKDIR", "work/toy-quick" if QUICK else "work/toy"))
print("workdir:", WORKDIR, "| quick:", QUICK)

# %% [markdown]
# ## Run (or resume) the pipeline
#
# Each step records its result in `WORKDIR/steps/<step>.json`; a finished step is skipped, an
# interrupted training step resumes from its checkpoints. A cold `--quick` run takes minutes.

# %%
ctx = StepContext(workdir=WORKDIR, quick=QUICK, progress=False)
outcomes = run_steps(pipeline.steps(), ctx)
print(summary_table(outcomes))
results = {o.name: o.result for o in outcomes if o.status in ("done", "cached")}

# %% [markdown]
# ## The world
#
# The data step wrote one JSONL manifest per use. A spoken test question carries its text, the
# expected answer, the synthesized audio (user voice) and the reference answer audio (assistant voice).

# %%
manifests = WORKDIR / "data" / "manifests"
print({k: v for k, v in results["data"]["records"].items()})
test_qa = [json.loads(line) for line in (manifests / "test_qa.jsonl").read_text().splitlines()]
for r in test_qa[:3]:
    print(f"{r['voice']:>16s}  {r['text']!r} -> {r['answer']!r}")
dialogue = json.loads((manifests / "dialogues_test.jsonl").read_text().splitlines()[0])
for turn in dialogue["turns"]:
    print("   ", "addressed" if turn["addressed"] else "aside    ", turn["text"])

# %%
q = test_qa[0]
display(Audio(str((manifests / q["audio"]).resolve())))

# %% [markdown]
# ## The frozen LLM
#
# Its text-QA accuracy on the held-out questions is the ceiling speech is compared against (the
# role Qwen2-7B-Instruct's text-only score plays in the paper). Its fingerprint (a hash of every
# weight) is taken when it is exported and again at the end, from the LLM inside the trained bundle.

# %%
print("text-QA accuracy:", results["text_eval"]["accuracy"], "of", results["text_eval"]["n"])
checks = pipeline.final_checks(ctx)
print("fingerprint after training:", results["llm"]["fingerprint"][:16])
print("fingerprint now           :", checks["llm_fingerprint_now"][:16], "from", checks["llm_fingerprint_source"])
print("unchanged:", checks["llm_fingerprint_now"] == results["llm"]["fingerprint"])

# %% [markdown]
# ## The report: every target, PASS or FAIL
#
# Thresholds are the full-run targets; `--quick` runs are held to loose smoke-test
# thresholds instead (a short run on a small world is not expected to reach them).

# %%
info = RunInfo(WORKDIR, QUICK, outcomes, checks, dict(pipeline.PENDING), pipeline.BUDGET_S[QUICK])
paths = write_report(WORKDIR / "report", info)
for row in evaluate_targets(info):
    print(f"{row['status']:8s} {row['target']}: {row['measured']} (target {row['threshold']})")
print("report:", paths["markdown"])

# %%
display(Image(str(WORKDIR / "report" / "plots" / "losses.png")))
if (WORKDIR / "report" / "plots" / "latency.png").exists():
    display(Image(str(WORKDIR / "report" / "plots" / "latency.png")))

# %% [markdown]
# ## Listen
#
# `talk/wavs/` holds each duplex conversation: the question (16 kHz) and the model's spoken answer
# (24 kHz); `speech_out_eval/wavs/` the forced answers next to the reference TTS.

# %%
turns = [json.loads(line) for line in (WORKDIR / "talk" / "wavs" / "turns.jsonl").read_text().splitlines()]
for i, t in enumerate(turns[:2]):
    print(f"Q: {t['question']}  expected: {t['expected']}  answered: {t.get('answer')!r}  "
          f"decision: {t['decision']}  endpoint delay: {t['endpoint_delay_ms']:.0f} ms  pocketsphinx: {t['heard']!r}")
    display(Audio(str(WORKDIR / "talk" / "wavs" / f"{i:02d}_question.wav")))
    display(Audio(str(WORKDIR / "talk" / "wavs" / f"{i:02d}_answer.wav")))

# %% [markdown]
# ## Talk to the trained model yourself
#
# The trained model is a native bundle (`WORKDIR/model`, the frozen LLM inside); the same files work
# with `fo-jax infer --model_path WORKDIR/model --input_wav your.wav --output_wav answer.wav`. Here:
# one spoken question through the streaming pipeline, chunk by chunk, in duplex mode.

# %%
from fo_jax.audio.io import load_audio  # noqa: E402
from fo_jax.inference.pipeline import DEFAULT_ROLE, Conversation  # noqa: E402
from fo_jax.toy.talk import MAX_LEN, load_engine, whole_chunks  # noqa: E402

engine = load_engine(WORKDIR / results["model"]["model_dir"])
question = load_audio(str((manifests / test_qa[1]["audio"]).resolve()), sample_rate=16000)[0]
conv = Conversation(engine, system_role=DEFAULT_ROLE, max_len=MAX_LEN)
probs = conv.listen(whole_chunks(question, extra_seconds=1.0))
print("state after listening:", conv.state.name, "| chunks heard:", conv.chunks_heard)
print("state-head probabilities of the last chunks (listen, speak, stop):\n", np.round(probs[-3:], 2))
reply = conv.respond()
answer = reply.read()
print("question:", test_qa[1]["text"], "| answer:", reply.text)
print("latency (ms):", {k: round(v) for k, v in (reply.latency_ms() or {}).items() if not k.startswith("at_")})
display(Audio(answer, rate=engine.vocoder.sample_rate))
