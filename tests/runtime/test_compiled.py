"""The default compile="auto": AOTInductor packages on disk, one per distinct piece (prologue,
block, epilogue) of each graph, and a later process that loads them without capturing the
model again (the path a user's second run takes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch


_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import torch, models, tokenfx
model = models.llama(layers=2, heads=4, kv_heads=2, head_dim=8)
gen = tokenfx.Generator(model)  # the default: compile='auto'
ids = torch.randint(0, models.VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
mask = torch.ones_like(ids); mask[1, :3] = 0
out = gen.generate(ids, attention_mask=mask, max_new_tokens=6, stop=[])
print(json.dumps({{"built": [str(k) for k in gen.built_graphs], "tokens": out.tolist()}}))
"""


def _run(cache: Path) -> dict:
    tests = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k != "TOKENFX_COMPILE"}  # the user's default
    env["TOKENFX_CACHE"] = str(cache)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT.format(tests=tests)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_second_process_loads_packages_without_capture(tmp_path):
    import models

    first = _run(tmp_path)
    assert first["built"], "the first process captures and compiles"
    kinds = sorted(p.name.split("-")[0] for p in (tmp_path / "aoti").glob("*.pt2"))
    # every graph (prefill, prefill_dense, decode) compiled block-wise: its two blocks share one package
    assert kinds.count("block") == 3 and set(kinds) == {"prologue", "block", "epilogue"} and len(kinds) <= 9
    second = _run(tmp_path)
    assert second["built"] == [], "a warm process must not capture or run passes"
    model = models.llama(layers=2, heads=4, kv_heads=2, head_dim=8)
    ids = torch.randint(0, models.VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        reference = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=[],
                                   pad_token_id=0)
    assert first["tokens"] == second["tokens"] == reference.tolist()
    assert json.loads(next((tmp_path / "sets").glob("*.json")).read_text())["meta"]["layout"]["cache_update"] == "inplace"
