"""attncap.store: selection, aggregation, token maps, save/load, spilling, budget, offload (CPU, fast)."""
import json

import pytest
import torch

from attncap.store import BudgetExceeded, Record, Store, load

L1 = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2"
L2 = "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2"
L3 = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1"


def rec(layer=L1, step=0, kind="map", relation="image->text", branch="cond", data=None, grid=(4, 4), nk=6, **kw):
    if data is None:
        n = grid[0] * grid[1] if grid else 5
        data = torch.rand(1, 1, n, nk) if kind in ("map", "tokens") else torch.rand(1, 1, n)
    return Record(layer=layer, step=step, timestep=1000.0 - 100 * step, relation=relation, kind=kind,
                  branch=branch, data=data, query_grid=grid, **kw)


@pytest.fixture
def store():
    s = Store()
    for step in range(3):
        for layer in (L1, L2, L3):
            s.add(rec(layer=layer, step=step, relation="image->image" if layer == L3 else "image->text",
                      nk=16 if layer == L3 else 6))
    s.add(rec(step=2, kind="entropy"))
    return s


def test_get_globs_lists_last(store):
    assert len(store) == 10 and len(store.get()) == 9
    assert {r.layer for r in store.get(layer="*attn2")} == {L1, L2}
    assert {r.layer for r in store.get(layer=[L1, L3])} == {L1, L3}
    assert [r.step for r in store.get(layer=L1, step="last")] == [2]
    assert {r.step for r in store.get(layer=L1, step=[0, 2])} == {0, 2}
    assert len(store.get(step=1, relation="image->text")) == 2
    assert [r.kind for r in store.get(kind="entropy")] == ["entropy"]
    assert store.get(branch="uncond") == []
    with pytest.raises(ValueError, match="step must be"):
        store.get(step="first")


def test_aggregate_mean_sum_max(store):
    recs = store.get(layer="*attn2", step=[0, 1])
    stacked = torch.stack([r.data for r in recs])
    torch.testing.assert_close(store.aggregate(layer="*attn2", step=[0, 1]), stacked.mean(0), rtol=0, atol=0)
    torch.testing.assert_close(store.aggregate(layer="*attn2", step=[0, 1], reduce="sum"), stacked.sum(0))
    torch.testing.assert_close(store.aggregate(layer="*attn2", step=[0, 1], reduce="max"), stacked.amax(0))
    with pytest.raises(ValueError, match="image->image"):
        store.aggregate(relation="video->text")


def test_aggregate_size_resizes_grids():
    s = Store()
    hi, lo = torch.zeros(1, 1, 8, 8, 3), torch.zeros(1, 1, 4, 4, 3)
    hi[0, 0, 2, 5, 1] = 1.0   # hot spot at (2, 5) of the 8x8 grid, key 1
    lo[0, 0, 1, 2, 1] = 1.0   # the same place on the 4x4 grid: rows 2-3, cols 4-5 of 8x8
    s.add(rec(layer=L1, data=hi.reshape(1, 1, 64, 3), grid=(8, 8)))
    s.add(rec(layer=L2, data=lo.reshape(1, 1, 16, 3), grid=(4, 4)))
    with pytest.raises(ValueError, match=r"size="):
        s.aggregate()
    out = s.aggregate(size=(8, 8))
    assert out.shape == (1, 1, 64, 3)
    m = out[0, 0, :, 1].reshape(8, 8)
    assert divmod(int(m.argmax()), 8) == (2, 5)
    assert m[2:4, 4:6].sum() > 0.5 * m.sum()
    assert float(out[0, 0, :, 0].abs().max()) == 0.0
    video = torch.rand(1, 1, 2 * 4 * 4, 3)   # (t, h, w) = (2, 4, 4): only h, w are resampled
    s.add(rec(layer="transformer.blocks.0.attn2", relation="video->text", data=video, grid=(2, 4, 4)))
    assert s.aggregate(relation="video->text", size=(8, 8)).shape == (1, 1, 2 * 8 * 8, 3)


def test_token_map_words_subwords_and_index():
    toks = ["<|startoftext|>", "a</w>", "Cat</w>", "on", "gir", "affe</w>", "\u2581cat", "<|endoftext|>"]
    s = Store(tokens={"text": toks})
    data = torch.rand(1, 2, 16, 8)
    s.add(rec(data=data, heads="all"))
    cat = s.token_map("cat")
    assert cat.shape == (4, 4)
    torch.testing.assert_close(cat, data[0][..., [2, 6]].mean(dim=(0, 2)).reshape(4, 4))
    torch.testing.assert_close(s.token_map("giraffe"), data[0][..., [4, 5]].mean(dim=(0, 2)).reshape(4, 4))
    torch.testing.assert_close(s.token_map(3), data[0, :, :, 3].mean(0).reshape(4, 4))
    with pytest.raises(ValueError, match="endoftext"):
        s.token_map("dog")
    with pytest.raises(ValueError, match="key"):
        s.token_map(11)
    # "tokens" records are preferred; their columns are the key indices in meta["keys"]
    tk = torch.rand(1, 1, 16, 2)
    s.add(rec(kind="tokens", data=tk, meta={"keys": [6, 2]}))
    torch.testing.assert_close(s.token_map("cat"), tk[0, 0].mean(-1).reshape(4, 4))
    assert s.token_map(2, size=(8, 8)).shape == (8, 8)


def test_save_load_round_trip(tmp_path, store):
    store.tokens = {"text": [["a</w>", "cat</w>"], ["a</w>", "dog</w>"]]}
    store.add(rec(kind="tokens", data=torch.rand(2, 3, 16, 2), heads=(0, 2, 5), branch=None,
                  meta={"keys": [3, 4], "note": "x"}))
    store.records[0].timestep = None
    path = store.save(tmp_path / "saved")
    assert (path / "index.json").exists()
    back = load(path)
    assert len(back) == len(store) and back.tokens == store.tokens and back.nbytes == store.nbytes
    for a, b in zip(store, back):
        for name in ("layer", "step", "timestep", "relation", "kind", "branch", "query_grid", "key_grid",
                     "heads", "meta"):
            assert getattr(a, name) == getattr(b, name), name
        assert b.data.dtype == torch.float32 and torch.equal(a.data, b.data)
    assert back.records[-1].heads == (0, 2, 5) and back.records[-1].query_grid == (4, 4)


def test_spill_survives_kill_before_index(tmp_path):
    spill = tmp_path / "spill"
    s = Store(spill_dir=spill)
    full = torch.rand(2, 1, 16, 6)   # CFG halves are views of one tensor
    s.add(rec(data=full[:1], branch="uncond"))
    s.add(rec(data=full[1:], branch="cond"))
    s.tokens = {"text": ["a</w>", "cat</w>"]}
    s.add(rec(step=1))
    log = spill / "index.jsonl"
    assert not (spill / "index.json").exists() and len(log.read_text().splitlines()) == 1 + 4  # header + 4 events

    def same(back, tokens=True):
        assert [r.branch for r in back] == ["uncond", "cond", "cond"] and [r.step for r in back] == [0, 0, 1]
        assert all(torch.equal(a.data, b.data) for a, b in zip(s, back))
        assert back.tokens == (s.tokens if tokens else None)

    same(load(spill))                       # killed before close: the log alone
    text = log.read_text()
    log.write_text(text[:-25])              # killed while writing the last line: its record is recovered
    with pytest.warns(UserWarning, match="torn last line"):
        same(load(spill))
    log.unlink()                            # no index at all: every record comes back from the stream
    same(load(spill), tokens=False)
    log.write_text(text)
    s.close()                               # the capture block's exit: index.json, no log
    assert not log.exists() and len(json.loads((spill / "index.json").read_text())["records"]) == 3
    same(load(spill))
    s.add(rec(step=2))                      # adding after close reopens the log
    assert [r.step for r in load(spill)] == [0, 0, 1, 2]
    with pytest.raises(FileExistsError):
        Store(spill_dir=spill)


def test_spill_stream_records_are_safetensors_files(tmp_path):
    """Each record of a spill stream is the bytes of a safetensors file that safetensors itself reads."""
    from safetensors.torch import load as st_load

    s = Store(spill_dir=tmp_path / "s")
    s.add(rec(step=0))
    s.add(rec(step=1, kind="entropy", data=torch.rand(2, 3, 5)))
    stream = (tmp_path / "s" / "records" / "spill-00000.stream").read_bytes()
    for line in (tmp_path / "s" / "index.jsonl").read_text().splitlines()[1:]:
        e = json.loads(line)["record"]
        got = st_load(stream[e["offset"]:e["offset"] + e["length"]])["data"]
        assert torch.equal(got, s.records[e["step"]].data)


def test_spilling_appends_one_line_per_record(tmp_path):
    """Spilling costs O(1) per record: one append to the stream and one to the log, nothing rewritten
    (index.json is written once, on close). The figure at 8,400 records: benchmarks/RESULTS.md (spill.py)."""
    s = Store(spill_dir=tmp_path / "s")
    sizes = []
    for step in range(60):
        s.add(rec(step=step))
        sizes.append((tmp_path / "s" / "index.jsonl").stat().st_size)
    growth = [b - a for a, b in zip(sizes, sizes[1:])]
    assert max(growth) - min(growth) <= 8 and not (tmp_path / "s" / "index.json").exists()
    assert [p.name for p in (tmp_path / "s" / "records").iterdir()] == ["spill-00000.stream"]


def _spilled(tmp_path, n=4):
    s = Store(spill_dir=tmp_path / "d")
    for step in range(n):
        s.add(rec(step=step))
    s.close()
    return s, tmp_path / "d"


@pytest.mark.parametrize("damage", ["zeros", "garbage"])
def test_damaged_spilled_record_costs_only_itself(tmp_path, damage):
    s, d = _spilled(tmp_path)
    e = json.loads((d / "index.json").read_text())["records"][2]
    stream = d / e["shard"]
    raw = bytearray(stream.read_bytes())
    raw[e["offset"]:e["offset"] + 40] = bytes(40) if damage == "zeros" else b"\xff" * 40
    stream.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match=r"skipped 1 record\(s\) of damaged shard .*spill-00000.stream"):
        back = load(d)
    assert [r.step for r in back] == [0, 1, 3]
    assert all(torch.equal(a.data, b.data) for a, b in zip([s.records[i] for i in (0, 1, 3)], back))


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage", "missing"])
def test_damaged_shard_costs_only_its_records(tmp_path, store, monkeypatch, damage):
    monkeypatch.setattr("attncap.store.SHARD_BYTES", 1)   # one record per shard
    path = store.save(tmp_path / "saved")
    shard = path / "maps-00002.safetensors"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif damage == "empty":
        shard.write_bytes(b"")
    elif damage == "garbage":
        shard.write_bytes(b"\xff" * 300)
    else:
        shard.unlink()
    with pytest.warns(UserWarning, match="maps-00002.safetensors"):
        back = load(path)
    kept = [r for i, r in enumerate(store.records) if i != 2]
    assert len(back) == len(kept) and all(torch.equal(a.data, b.data) for a, b in zip(kept, back))


def test_damaged_saved_shard_keeps_the_records_before_the_damage(tmp_path, store):
    path = store.save(tmp_path / "saved")
    shard = path / "maps-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])      # the last record's bytes are cut
    with pytest.warns(UserWarning, match=r"1 record\(s\) of damaged shard .*maps-00000"):
        back = load(path)
    assert len(back) == len(store) - 1
    assert all(torch.equal(a.data, b.data) for a, b in zip(store, back))


@pytest.mark.parametrize("shard", ["../outside.safetensors", "records/../../outside.safetensors", "ABS",
                                   "records\\..\\..\\outside.safetensors"])
def test_shard_paths_stay_inside_the_store(tmp_path, store, shard):
    d = store.save(tmp_path / "d")
    outside = tmp_path / "outside.safetensors"   # a valid shard that must not be read
    outside.write_bytes((d / "maps-00000.safetensors").read_bytes())
    index = json.loads((d / "index.json").read_text())
    index["records"][1]["shard"] = str(outside) if shard == "ABS" else shard
    (d / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"index.json record 1 is malformed.*outside the store folder"):
        load(d)


@pytest.mark.parametrize("edit, words", [
    (lambda e: e.pop("layer"), "missing \\['layer'\\]"), (lambda e: e.update(step="3"), "step='3'"),
    (lambda e: e.update(kind="heatmap"), "kind='heatmap'"), (lambda e: e.update(query_grid=[4, -4]), "query_grid"),
    (lambda e: e.update(heads="some"), "heads='some'"), (lambda e: e.update(key=7), "'key' a tensor"),
    (lambda e: e.update(call=-1), "call=-1"),
])
def test_malformed_index_entry_is_named(tmp_path, edit, words):
    _, d = _spilled(tmp_path)
    index = json.loads((d / "index.json").read_text())
    edit(index["records"][2])
    (d / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"index.json record 2 is malformed .*" + words):
        load(d)


def test_index_of_another_format_is_refused(tmp_path):
    _, d = _spilled(tmp_path)
    (d / "index.json").write_text(json.dumps({"format": "other", "records": []}))
    with pytest.raises(ValueError, match="not an attncap.store index"):
        load(d)
    (d / "index.json").write_text(json.dumps({"format": "attncap.store", "version": 1, "records": [7]}))
    with pytest.raises(ValueError, match="record 0 is malformed .*not a JSON object"):
        load(d)


def test_save_refuses_a_store_folder_unless_overwrite(tmp_path, store):
    path = store.save(tmp_path / "saved")
    small = Store()
    small.add(rec(step=7))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        small.save(path)
    assert len(load(path)) == len(store)
    _, spilled = _spilled(tmp_path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        small.save(spilled)
    for d in (path, spilled):
        small.save(d, overwrite=True)
        back = load(d)
        assert [r.step for r in back] == [7] and not list((d / "records").glob("*.safetensors"))
        assert sorted(p.name for p in d.iterdir() if p.is_file()) == ["index.json", "maps-00000.safetensors"]


def test_calls_keep_their_own_prompt_tokens(tmp_path):
    s = Store(spill_dir=tmp_path / "c")
    s.set_call_tokens(0, {"text": ["<s>", "a</w>", "cat</w>"]})
    s.set_call_tokens(1, {"text": ["<s>", "cat</w>", "a</w>"]})
    first, second = torch.rand(1, 1, 16, 3), torch.rand(1, 1, 16, 3)
    s.add(rec(data=first, nk=3))
    s.add(rec(data=second, nk=3, call=1))
    assert s.tokens == s.tokens_of(0) and s.tokens_of(5) == s.tokens_of(0)
    torch.testing.assert_close(s.token_map("cat", call=0), first[0, 0, :, 2].reshape(4, 4))
    torch.testing.assert_close(s.token_map("cat", call=1), second[0, 0, :, 1].reshape(4, 4))
    both = (first[0, 0, :, 2] + second[0, 0, :, 1]).reshape(4, 4) / 2
    torch.testing.assert_close(s.token_map("cat"), both)   # each record's word looked up in its own prompt
    assert [len(s.get(call=c)) for c in (0, 1, 2)] == [1, 1, 0]
    s.close()
    back = load(tmp_path / "c")
    assert back.call_tokens == s.call_tokens and [r.call for r in back] == [0, 1]
    torch.testing.assert_close(back.token_map("cat"), both)
    back.tokens = {"text": ["cat</w>", "a</w>", "<s>"]}   # the user's tokens label every call
    assert back.call_tokens == {} and back.tokens_of(1) == back.tokens
    torch.testing.assert_close(back.token_map("cat", call=1), second[0, 0, :, 0].reshape(4, 4))


def test_budget_exceeded_keeps_earlier_records(tmp_path):
    s = Store(max_bytes=2 * 16 * 6 * 4, spill_dir=tmp_path / "b")
    s.add(rec())
    s.add(rec(step=1))
    with pytest.raises(BudgetExceeded, match=r"holds 768 bytes.*384.*max_bytes=768"):
        s.add(rec(step=2))
    assert len(s) == 2 and s.nbytes == 768 and [r.step for r in s] == [0, 1]
    assert len(load(tmp_path / "b")) == 2


def test_offload_and_validation():
    s = Store(offload="cpu")
    s.add(rec(data=torch.rand(1, 1, 16, 6, dtype=torch.float64)))
    assert s.records[0].data.device.type == "cpu" and s.records[0].data.dtype == torch.float32
    with pytest.raises(ValueError, match="kind"):
        s.add(rec(kind="entropy", data=torch.rand(1, 1, 16, 6)))
    assert "steps 0" in s.summary() and L1 in s.summary()
