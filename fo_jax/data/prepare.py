"""Turns a folder of audio + transcripts into a JSONL manifest, checking every file.

Transcripts come from, in order of preference: a ``<stem>.txt`` (or ``.lab``) next to each audio
file, or LibriSpeech-style ``*.trans.txt`` files (``<utterance-id> <text>`` per line). Unreadable,
empty or untranscribed audio is reported (path + reason) and left out.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

from tqdm import tqdm

from fo_jax.audio.io import audio_info
from fo_jax.data.manifest import resolve, write_manifest
from fo_jax.errors import AudioError, FoJaxError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


def _trans_files(root: Path) -> dict[str, str]:
    texts = {}
    for file in root.rglob("*.trans.txt"):
        for line in file.read_text(encoding="utf-8").splitlines():
            key, _, text = line.strip().partition(" ")
            if key:
                texts[key] = text.strip()
    return texts


def check_audio(record: dict, base: Path, key: str = "audio") -> str | None:
    """Manifest validator: the record's audio file exists, opens and is not empty."""
    try:
        frames, rate, _ = audio_info(resolve(record[key], base))
    except AudioError as e:
        return str(e)
    return None if frames > 0 else f"{record[key]}: empty audio"


def prepare_folder(audio_dir: str | os.PathLike, manifest: str | os.PathLike,
                   progress: bool = True) -> tuple[list[dict], list[str]]:
    """Scans ``audio_dir`` and writes ``manifest``. Returns (records, problems).

    Records: ``{"audio": path relative to the manifest's folder, "text": ..., "duration": seconds}``.
    """
    root, manifest = Path(audio_dir), Path(manifest)
    if not root.is_dir():
        raise FoJaxError(f"{root}: not a directory")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise FoJaxError(f"{root}: no audio files ({', '.join(AUDIO_SUFFIXES)})")
    trans = _trans_files(root)
    records, problems = [], []
    base = manifest.resolve().parent
    for path in tqdm(files, desc="prepare", unit="file", disable=not progress):
        sidecar = next((path.with_suffix(s) for s in (".txt", ".lab") if path.with_suffix(s).exists()), None)
        text = sidecar.read_text(encoding="utf-8").strip() if sidecar else trans.get(path.stem)
        if not text:
            problems.append(f"{path}: no transcript" if text is None else f"{path}: empty transcript")
            continue
        try:
            frames, rate, _ = audio_info(path)
        except AudioError as e:
            problems.append(str(e))
            continue
        if frames == 0:
            problems.append(f"{path}: empty audio")
            continue
        records.append({"audio": os.path.relpath(path.resolve(), base), "text": " ".join(text.split()),
                        "duration": round(frames / rate, 3)})
    if not records:
        raise FoJaxError(f"{root}: no usable audio ({len(problems)} problems, first: {problems[0]})")
    write_manifest(manifest, records)
    return records, problems
