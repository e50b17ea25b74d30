"""JSONL manifests: one JSON object per line, validated with a report of what was rejected.

Every stage reads its examples from a manifest. A bad line (unparseable JSON, a missing field, an
empty transcript, a missing or unreadable audio file) is reported with its file, line and reason;
the ``policy`` decides whether such lines are skipped (``skip``) or stop the run (``strict``).
Nothing invalid is ever trained on silently.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from fo_jax.errors import FoJaxError


class ManifestError(FoJaxError):
    """A manifest that cannot be used (missing file, or a bad line under the strict policy)."""


Validator = Callable[[dict, Path], str | None]  # returns a reason when the record is bad


def read_manifest(path: str | os.PathLike, required: Sequence[str] = (), validate: Validator | None = None,
                  policy: str = "skip", report: list[str] | None = None) -> list[dict]:
    """Reads a JSONL manifest.

    Args:
      path: the manifest; relative ``audio``-like paths inside it resolve against its folder.
      required: fields every record must have, non-empty.
      validate: extra check per record (e.g. the audio file opens); returns a reason or None.
      policy: ``skip`` drops bad records (listed in ``report``), ``strict`` raises on the first.
      report: receives one ``"file:line: reason"`` string per dropped record.
    """
    if policy not in ("skip", "strict"):
        raise ManifestError(f"unknown manifest policy {policy!r}; expected skip or strict")
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest not found") from None
    except IsADirectoryError:
        raise ManifestError(f"{path}: is a directory, not a JSONL manifest") from None
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not a UTF-8 text file") from None
    records, problems = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        reason = None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            record, reason = None, f"not valid JSON ({e.msg})"
        if record is not None and not isinstance(record, dict):
            reason = "not a JSON object"
        if reason is None:
            missing = [k for k in required if k not in record or record[k] in ("", None, [])]
            if missing:
                reason = f"missing or empty field(s) {missing}"
        if reason is None and validate is not None:
            reason = validate(record, path.parent)
        if reason is not None:
            message = f"{path}:{number}: {reason}"
            if policy == "strict":
                raise ManifestError(message)
            problems.append(message)
            continue
        records.append(record)
    if report is not None:
        report.extend(problems)
    if not records:
        raise ManifestError(f"{path}: no usable records" + (f" ({len(problems)} rejected)" if problems else ""))
    return records


def resolve(record_path: str, base: Path) -> Path:
    p = Path(record_path)
    return p if p.is_absolute() else base / p


def write_manifest(path: str | os.PathLike, records: Sequence[dict[str, Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
