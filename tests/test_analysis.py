"""attncap.analysis and attncap.prompts on planted stores (maps with known hot spots) and on
tokenizers built offline from a small vocabulary (no downloads).

The planted store (also used by test_viz and test_cli) looks like a small SD capture:
two cross-attention layers at 16x24 and 8x12, three steps, six text keys
    0 <|startoftext|>   1 a   2 red   3 gir   4 affe (</w>)   5 <|endoftext|>
"giraffe" (keys 3, 4) is hot around GIRAFFE = (0.3, 0.7) of the image, "red" around RED = (0.7, 0.25),
the start token takes a large uniform share (an attention sink), and the hot spots sharpen with the
step. Self-attention layers (image->image) attend to a neighbourhood of each query.
"""
from __future__ import annotations

import math
import string

import pytest
import torch

from attncap import Record, Store, load
from attncap import analysis as A
from attncap import prompts

GIRAFFE = (0.3, 0.7)
RED = (0.7, 0.25)
TOKENS = ["<|startoftext|>", "a</w>", "red</w>", "gir", "affe</w>", "<|endoftext|>"]
PROMPT = "a red giraffe"
LAYERS = [("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2", (16, 24)),
          ("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2", (8, 12))]
SELF = ("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1", (16, 24))
STEPS = 3

pytestmark = pytest.mark.usefixtures("one_thread")


def blob(grid, centre, sigma=0.08):
    """exp(-d^2 / 2 sigma^2) on a grid of cell centres, distances in image fractions."""
    h, w = grid
    yy = (torch.arange(h) + 0.5) / h
    xx = (torch.arange(w) + 0.5) / w
    d2 = (yy[:, None] - centre[0]) ** 2 + (xx[None, :] - centre[1]) ** 2
    return torch.exp(-d2 / (2 * sigma**2))


def text_map(grid, step: int, heads: int = 1) -> torch.Tensor:
    """[1, heads, h*w, 6]: rows sum to 1 over the keys; the planted words sharpen with the step."""
    strength = 2.0 + 3.0 * step
    f = torch.full((*grid, 6), 0.2)
    f[..., 0] = 1.5  # the start token: a uniform sink
    f[..., 1] += 0.02  # "a": flat, a little above the floor
    f[..., 2] += 0.5 * strength * blob(grid, RED)
    g = strength * blob(grid, GIRAFFE)
    f[..., 3] += g
    f[..., 4] += 1.2 * g
    p = f / f.sum(-1, keepdim=True)
    return p.reshape(1, 1, -1, 6).expand(1, heads, -1, -1).clone()


def self_map(grid) -> torch.Tensor:
    """[1, 1, N, N]: every query attends to a blob around itself."""
    h, w = grid
    y = ((torch.arange(h) + 0.5) / h).repeat_interleave(w)
    x = ((torch.arange(w) + 0.5) / w).repeat(h)
    b = torch.exp(-((y[:, None] - y[None]) ** 2 + (x[:, None] - x[None]) ** 2) / (2 * 0.1**2))
    return (b / b.sum(-1, keepdim=True))[None, None]


def planted_store(tokens: bool = True, stats: bool = True, self_attention: bool = True) -> Store:
    store = Store(tokens={"text": list(TOKENS), "prompt": PROMPT} if tokens else None)
    for step in range(STEPS):
        t = 999.0 - 333 * step
        for layer, grid in LAYERS:
            data = text_map(grid, step)
            for branch, d in (("uncond", torch.full_like(data, 1 / 6)), ("cond", data)):
                store.add(Record(layer, step, t, "image->text", "map", branch, d, grid, None))
                if stats:
                    store.add(Record(layer, step, t, "image->text", "entropy", branch, A.entropy(d[0], -1)[None], grid, None))
        if self_attention:
            layer, grid = SELF
            store.add(Record(layer, step, t, "image->image", "map", "cond", self_map(grid), grid, grid))
    return store


def hot_fraction(m: torch.Tensor) -> tuple[float, float]:
    """(y, x) of a map's maximum as fractions of its grid (cell centres)."""
    _, (i, j) = A.peak(m)
    return (i + 0.5) / m.shape[0], (j + 0.5) / m.shape[1]


def close(a, b, tol=0.08) -> bool:
    return abs(a[0] - b[0]) <= tol and abs(a[1] - b[1]) <= tol



# ------------------------------------------------------------------ statistics

def test_entropy_gini_topk_peak_on_known_distributions():
    n = 16
    uniform, onehot = torch.full((n,), 1 / n), torch.zeros(n)
    onehot[5] = 1
    assert A.entropy(uniform).item() == pytest.approx(math.log(n), rel=1e-5)
    assert A.entropy(onehot).item() == pytest.approx(0, abs=1e-6)
    assert A.entropy(3 * uniform).item() == pytest.approx(math.log(n), rel=1e-5)  # normalised first
    assert A.gini(uniform).item() == pytest.approx(0, abs=1e-6)
    assert A.gini(onehot).item() == pytest.approx((n - 1) / n, rel=1e-5)
    assert A.gini(torch.zeros(n)).item() == 0
    assert A.topk_mass(onehot, k=1).item() == pytest.approx(1)
    assert A.topk_mass(uniform, frac=0.25).item() == pytest.approx(0.25)
    m = torch.zeros(5, 7)
    m[3, 2] = 4
    assert A.peak(m) == (4.0, (3, 2))
    assert A.iou(m > 0, m > 0) == 1.0 and A.iou(m > 0, m < 0) == 0.0


# ------------------------------------------------------------------ aggregation and words

def test_aggregate_resizes_layers_to_one_grid_and_finds_the_planted_words():
    store = planted_store()
    agg = A.aggregate(store)  # largest grid by default: 16x24
    assert agg.data.shape == (16, 24, 6) and agg.keys == list(range(6)) and agg.records == 2 * STEPS
    assert close(hot_fraction(agg.word(A.keys_of(store, "giraffe"))), GIRAFFE)
    assert close(hot_fraction(A.word_map(store, "red", size=(32, 48))), RED)
    assert A.word_map(store, "giraffe", size=(32, 48)).shape == (32, 48)
    # only the 8x12 layer, at its own size
    small = A.aggregate(store, layer="*up_blocks*")
    assert small.data.shape == (8, 12, 6)
    assert A.keys_of(store, "giraffe") == [3, 4] and A.keys_of(store, 2) == [2] and A.keys_of(store, "4") == [4]
    with pytest.raises(ValueError, match="not in the prompt"):
        A.keys_of(store, "zebra")
    with pytest.raises(ValueError, match="relations"):
        A.aggregate(store, relation="video->text")


def test_aggregate_of_tokens_records_and_groups():
    store = Store(tokens={"text": list(TOKENS)})
    for layer, grid in LAYERS:
        full = text_map(grid, 2)
        store.add(Record(layer, 0, 1.0, "image->text", "tokens", "cond", full[..., [2, 3, 4]], grid, None,
                         meta={"keys": [2, 3, 4]}))
    agg = A.aggregate(store, size=(16, 24))
    assert agg.keys == [2, 3, 4]
    assert close(hot_fraction(agg.word([3, 4])), GIRAFFE)
    with pytest.raises(ValueError, match="not captured"):
        agg.word([1])
    groups = A.group_maps(store, {"animal": ["giraffe"], "colour": ["red"]})
    assert close(hot_fraction(groups["animal"]), GIRAFFE) and close(hot_fraction(groups["colour"]), RED)


def test_token_importance_ranks_the_planted_tokens_and_leaves_out_special_ones():
    store = planted_store()
    ranked = A.token_importance(store)
    assert {t.label for t in ranked} == {"a", "red", "gir", "affe"}
    assert ranked[0].label == "affe" and ranked[0].index == 4
    assert [t.index for t in A.token_importance(store, exclude_special=False, top=1)] == [0]  # the sink
    s = A.token_scores(store)
    assert s.shape == (6,) and torch.all(s > 0)
    steps, by_step = A.importance_by_step(store)
    assert steps == list(range(STEPS)) and by_step.shape == (STEPS, 6)
    assert by_step[-1, 4] > by_step[0, 4]  # the giraffe gains attention as it sharpens
    assert [(st, t.label) for st, t in A.top_token_by_step(store)] == [(s, "affe") for s in range(STEPS)]
    # without tokens: position labels, nothing is special
    bare = planted_store(tokens=False)
    assert A.token_importance(bare, top=1)[0].label == "0"


def test_evolution_sharpens_and_query_row_finds_the_query_neighbourhood():
    store = planted_store()
    steps, maps = A.evolution(store, "giraffe")
    assert steps == [0, 1, 2] and maps.shape == (3, 16, 24)
    peaks = [float(m.max()) for m in maps]
    assert peaks[0] < peaks[1] < peaks[2]
    for point in ((0.25, 0.25), (0.8, 0.6)):
        row = A.query_row(store, point)
        assert row.shape == (16, 24) and close(hot_fraction(row), point, 0.07)
    assert A.received(A.spatial_records(store)[0]).shape == (16, 24)


def test_layer_stats_rows_per_layer_and_relation():
    store = planted_store()
    rows = A.layer_stats(store)
    assert {(r["layer"], r["relation"]) for r in rows} == {(l, "image->text") for l, _ in LAYERS} | {(SELF[0], "image->image")}
    cross = next(r for r in rows if r["layer"] == LAYERS[0][0])
    assert cross["entropy_source"] == "exact" and 0 < cross["entropy"] < math.log(6)
    assert cross["mass"] == pytest.approx(1.0, abs=1e-5) and cross["top_token"] == "affe"
    assert 0 < cross["sparsity"] < 1 and 0 < cross["peak"] <= 1
    selfrow = next(r for r in rows if r["relation"] == "image->image")
    assert selfrow["entropy_source"] == "block" and selfrow["top_token"].startswith("(")
    # the entropy of the maps matches the captured entropy
    bare = [r for r in A.layer_stats(planted_store(stats=False)) if r["layer"] == LAYERS[0][0]][0]
    assert bare["entropy"] == pytest.approx(cross["entropy"], rel=1e-4) and bare["entropy_source"] == "block"


# ------------------------------------------------------------------ masks

def test_ledits_mask_covers_the_planted_region():
    grid = (16, 16)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    region = ((yy - 20) ** 2 + (xx - 40) ** 2) < 12 ** 2  # 7% of the image at 64x64
    coarse = torch.nn.functional.avg_pool2d(region.float()[None, None], 4)[0, 0]  # as a 16x16 map sees it
    noisy = coarse + 0.05 * torch.rand(grid)
    q = 1 - region.float().mean().item()
    mask = A.ledits_mask(noisy, quantile=q, sigma=0.5, size=(64, 64))
    assert mask.dtype == torch.bool and mask.shape == (64, 64)
    assert A.iou(mask, region) > 0.8
    with pytest.raises(ValueError, match="quantile"):
        A.ledits_mask(noisy, quantile=1.5)


def test_word_mask_of_the_planted_store_sits_on_the_word():
    store = planted_store()
    m = A.word_mask(store, "giraffe", size=(80, 120), quantile=0.95)
    assert m.shape == (80, 120) and 0.03 < m.float().mean() < 0.08
    ys, xs = torch.nonzero(m, as_tuple=True)
    assert close((ys.float().mean().item() / 80, xs.float().mean().item() / 120), GIRAFFE, 0.05)
    planted = blob((80, 120), GIRAFFE) > 0.5
    assert A.iou(A.word_mask(store, "giraffe", size=(80, 120), quantile=1 - planted.float().mean().item(),
                             step=2), planted) > 0.8


def test_gaussian_blur_keeps_constants_and_spreads_a_point():
    x = torch.full((3, 9, 11), 2.0)
    torch.testing.assert_close(A.gaussian_blur(x, 1.5), x)
    p = torch.zeros(9, 9)
    p[4, 4] = 1
    b = A.gaussian_blur(p, 1.0)
    assert b.sum().item() == pytest.approx(1.0, abs=1e-5) and b[4, 4] < 1 and A.peak(b)[1] == (4, 4)


# ------------------------------------------------------------------ prompts

def clip_tokenizer(length: int = 12):
    """A CLIP BPE tokenizer over a tiny vocabulary, built offline: 'giraffe' -> 'gir' + 'affe</w>'."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []

    def add(t):
        vocab.setdefault(t, len(vocab))

    for c in string.ascii_lowercase:
        add(c)
        add(c + "</w>")
    add("<|startoftext|>")
    add("<|endoftext|>")

    def build(pieces):
        cur = pieces[0]
        for p in pieces[1:]:
            merges.append((cur, p))
            cur += p
            add(cur)

    for w in ["a", "cat", "on", "red", "sofa"]:
        build(list(w[:-1]) + [w[-1] + "</w>"])
    build(list("gir"))
    build(["a", "f", "f", "e</w>"])
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=length)


def t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581a", -1.0), ("\u2581cat", -2.0),
              ("\u2581gir", -3.0), ("affe", -3.0), ("\u2581on", -2.0), ("\u2581red", -2.0), ("\u2581sofa", -2.0),
              ("\u2581", -5.0)] + [(c, -10.0) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def test_clip_alignment_maps_words_to_sub_word_tokens():
    a = prompts.align(clip_tokenizer(12), "A giraffe on a red sofa", length=12)
    assert len(a) == 12
    assert a.tokens[:8] == ["<|startoftext|>", "a</w>", "gir", "affe</w>", "on</w>", "a</w>", "red</w>", "sofa</w>"]
    assert a.labels[:4] == ["<sot>", "a", "gir", "affe"] and a.labels[-1] == "<eot>"
    assert a.words == [("A", [1]), ("giraffe", [2, 3]), ("on", [4]), ("a", [5]), ("red", [6]), ("sofa", [7])]
    assert a.indices("giraffe") == [2, 3] and a.indices("a") == [1, 5] and a.indices("red sofa") == [6, 7]
    assert a.label_of("giraffe") == "giraffe (gir|affe)" and a.label_of(7) == "sofa"
    assert a.special[0] and a.special[-1] and not any(a.special[1:8])
    # truncation: the tokenizer's length cuts the prompt, as the pipeline's text encoder sees it
    short = prompts.align(clip_tokenizer(5), "a giraffe on a red sofa", length=5)
    assert [w for w, _ in short.words] == ["a", "giraffe"] and len(short) == 5


def test_t5_alignment_and_sd3_concatenation():
    t5 = prompts.align(t5_tokenizer(), "a giraffe on a red sofa", length=10)
    assert t5.tokens[:7] == ["\u2581a", "\u2581gir", "affe", "\u2581on", "\u2581a", "\u2581red", "\u2581sofa"]
    assert t5.indices("giraffe") == [1, 2] and t5.tokens[7] == "</s>" and t5.labels[8] == "<pad>"
    clip = prompts.align(clip_tokenizer(12), "a giraffe on a red sofa", length=12)
    both = prompts.concat(clip, t5)
    assert len(both) == 22 and both.indices("giraffe") == [2, 3, 13, 14]

    class FakeSD3:  # the components an SD3 pipeline has
        tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(12), clip_tokenizer(12), t5_tokenizer()

    FakeSD3.__name__ = "StableDiffusion3Pipeline"
    a = prompts.for_pipeline(FakeSD3(), "a giraffe", max_sequence_length=6)
    assert len(a) == 12 + 6 and a.indices("giraffe") == [2, 3, 13, 14]

    class NoTokenizer:
        tokenizer = None

    assert prompts.for_pipeline(NoTokenizer(), "a cat") is None


def test_alignment_without_offsets_positions_and_store_round_trip(tmp_path):
    words = prompts.align_words("a giraffe, on sofa", ["<s>", "\u2581a", "\u2581gir", "affe", ",", "\u2581on",
                                                       "\u2581so", "fa", "</s>"])
    assert words == [("a", [1]), ("giraffe", [2, 3]), (",", [4]), ("on", [5]), ("sofa", [6, 7])]
    pos = prompts.positions(4)
    assert pos.labels == ["0", "1", "2", "3"] and pos.words == []
    assert prompts.clean("\u2581cat") == "cat" and prompts.clean("##ing") == "ing"
    a = prompts.align(clip_tokenizer(8), "a red giraffe", length=8)
    store = planted_store(tokens=False)
    store.tokens = a.fit(6).to_tokens()
    assert store.tokens["text"] == TOKENS
    back = load(store.save(tmp_path / "s"))
    b = A.alignment_of(back)
    assert b.words == [("a", [1]), ("red", [2]), ("giraffe", [3, 4])] and b.labels == [
        "<sot>", "a", "red", "gir", "affe", "<eot>"]
    # the store's own word lookup agrees
    torch.testing.assert_close(back.token_map("giraffe", size=(16, 24)),
                               A.word_map(back, "giraffe", size=(16, 24)), atol=1e-6, rtol=1e-5)
    # a store with tokens but no word list spells words out of the pieces
    assert A.keys_of(planted_store(), "giraffe") == [3, 4]
