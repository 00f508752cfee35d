"""benchmarks/e2e_wan.py in its tiny mode (a 2-layer float32 Wan transformer on CPU): every mode runs,
the capture modes store one record per matching layer, and the RESULTS.md section is written."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "e2e_wan.py"


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("bench_e2e_wan", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module



def test_tiny_run_times_every_mode_and_writes_its_section(e2e, tmp_path, one_thread):
    results = tmp_path / "RESULTS.md"
    before = "# Results\n\nintro\n\n## Other\n\nkept as it is\n"
    results.write_text(before)
    out = tmp_path / "e2e.json"
    e2e.main(["--tiny", "--out", str(out), "--write-results", "--results", str(results)])

    doc = json.loads(out.read_text())
    rows = {r["mode"]: r for r in doc["rows"]}
    assert list(rows) == ["off", "tokens", "pooled_self", "naive"]
    assert all(r["status"] == "ok" and r["median_ms"] > 0 and len(r["times_ms"]) == 3 for r in rows.values())
    for mode, relation in (("tokens", "video->text"), ("pooled_self", "video->video"), ("naive", "video->video")):
        row = rows[mode]
        assert row["store_bytes"] > 0 and row["relations"] == [relation]
        assert row["records"] == row["layers"] == 2  # one record per attn2 / attn1 layer of the 2 blocks
    assert rows["off"]["overhead_pct"] == 0.0
    assert all(isinstance(r["overhead_pct"], float) and math.isfinite(r["overhead_pct"]) for r in rows.values())
    # The store holds what the options ask for: 16 text tokens per video token; 3x1x1 pooled bins.
    tokens = doc["config"]["video_tokens"]
    assert rows["tokens"]["store_bytes"] == 2 * tokens * 16 * 4
    assert rows["pooled_self"]["store_bytes"] == 2 * 3 * 3 * 4
    assert rows["naive"]["store_bytes"] == 2 * tokens * tokens * 4
    assert set(doc["versions"]) == {"torch", "triton", "diffusers", "attncap"}

    text = results.read_text()
    assert text.startswith(before + "\n" + e2e.HEADING + "\n")
    assert "| naive |" in text and "Command: `python benchmarks/e2e_wan.py --tiny" in text


def test_naive_is_refused_on_cpu_when_it_would_not_fit(e2e, monkeypatch, one_thread):
    model = e2e.build_model(e2e.TINY, "cpu", torch.float32)
    monkeypatch.setattr(e2e, "available_bytes", lambda device: 0)
    row = e2e.measure_mode("naive", model, {}, "cpu", 3, e2e.TINY, 48)
    assert row["status"].startswith("out of memory (would need ") and row["need_bytes"] > 0
    assert "median_ms" not in row
    assert e2e.is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 bytes"))
    assert not e2e.is_oom(RuntimeError("shape mismatch"))
