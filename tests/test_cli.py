"""The attncap command line on a tiny random-weight SD pipeline saved to a folder (no downloads):
``attncap run`` with --prompt-embeds (the pipeline has a tokenizer built offline but no text
encoder), ``attncap render`` of the saved run, readable errors, and ``attncap demo``."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

import attncap
from attncap.cli import main
from test_analysis import clip_tokenizer
from tiny_pipelines import tiny_sd

PROMPT = "a giraffe on a red sofa"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A saved StableDiffusionPipeline folder (tokenizer, no text encoder) and a prompt-embeds file."""
    root = tmp_path_factory.mktemp("cli")
    pipe = tiny_sd()
    pipe.register_modules(tokenizer=clip_tokenizer(9))  # 9 keys: <sot> a gir affe on a red sofa <eot>
    pipe.save_pretrained(root / "tiny-sd")
    g = torch.Generator().manual_seed(0)
    save_file({"prompt_embeds": torch.randn(1, 9, 16, generator=g),
               "negative_prompt_embeds": torch.randn(1, 9, 16, generator=g)}, str(root / "embeds.safetensors"))
    return root


@pytest.fixture(scope="module")
def run_dir(model):
    args = ["run", str(model / "tiny-sd"), "--prompt", PROMPT, "--prompt-embeds", str(model / "embeds.safetensors"),
            "--steps", "2", "--height", "32", "--width", "48", "--relations", "image->text,image->image",
            "--pool", "2", "--out", str(model / "results"), "--quiet"]
    assert main(args) == 0
    (d,) = list((model / "results").iterdir())
    return d


def test_run_writes_the_image_the_store_and_every_view(run_dir):
    assert re.match(r"\d{8}-\d{6}-a-giraffe-on-a-red-sofa$", run_dir.name)
    assert any((run_dir / "records").iterdir())  # the store spilled into the run folder as it was captured
    for name in ("image.png", "index.json", "run.json", "token_heatmaps.png", "explorer.html",
                 "evolution.gif", "masks.png", "self_attention.png", "importance.png", "stats.json",
                 "report.md", "report.html", "words/giraffe.png", "words/giraffe_overlay.png", "masks/giraffe.npy"):
        assert (run_dir / name).exists(), name
    assert any((run_dir / "tree").rglob("step_001.png"))
    store = attncap.load(run_dir)
    assert store.tokens["text"][:4] == ["<|startoftext|>", "a</w>", "gir", "affe</w>"]
    assert ["giraffe", [2, 3]] in store.tokens["words"]
    assert {r.relation for r in store} == {"image->text", "image->image"} and {r.step for r in store} == {0, 1}
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["records"] == len(store) and meta["pipeline"] == "StableDiffusionPipeline" and meta["pool"] == 2

    md = (run_dir / "report.md").read_text()
    assert PROMPT in md
    for ref in re.findall(r"\]\(([^)]+)\)", md):
        assert (run_dir / ref).exists(), ref
    rows = [l for l in md.splitlines() if l.startswith("| unet.")]
    layers = {(r.layer, r.relation) for r in store}
    assert len(rows) == len(layers)  # one stats row per (layer, relation)
    assert "giraffe (gir|affe)" in md or "affe" in md


def test_render_redraws_a_saved_run_elsewhere(run_dir, tmp_path):
    out = tmp_path / "again"
    assert main(["render", str(run_dir), "--out", str(out), "--words", "giraffe", "6", "--no-tree", "--quiet"]) == 0
    assert (out / "report.md").exists() and (out / "words" / "giraffe_overlay.png").exists()
    assert (out / "words" / "red.png").exists()  # key 6 is "red"
    assert not (out / "tree").exists()


@pytest.mark.parametrize("flag, value, says", [
    ("--pool", "0", "positive int"),
    ("--relations", "image-text", "is not a relation"),
    ("--heads", "some", "'mean', 'all' or head indices"),
    ("--stats", "entropy,max", "choose from entropy, peak, colsum"),
    ("--capture-steps", "first", "'all', 'last' or step indices"),
    ("--dtype", "float8", "invalid choice"),
    ("--steps", "-3", "positive int"),
])
def test_bad_arguments_name_the_flag_and_what_works(flag, value, says, capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "some/model", "--prompt", "x", flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and says in err


def test_readable_errors_for_models_files_and_words(model, capsys, tmp_path):
    cases = [
        (["run", str(tmp_path / "missing"), "--prompt", "x"], "does not exist"),
        (["run", str(tmp_path), "--prompt", "x"], "no model_index.json"),
        (["run", str(model / "tiny-sd"), "--prompt", "x", "--quiet"], "has no text encoder; pass --prompt-embeds"),
        (["run", str(model / "tiny-sd"), "--prompt-embeds", str(tmp_path / "none.safetensors")], "no such file"),
        (["render", str(tmp_path)], "no attncap store"),
        (["run", str(model / "tiny-sd"), "--prompt", PROMPT, "--prompt-embeds", str(model / "embeds.safetensors"),
          "--tokens", "zebra", "--quiet"], "--tokens: word 'zebra' is not in the prompt"),
    ]
    for argv, says in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("attncap: error:") and says in err, (argv, err)


def test_demo_draws_grounded_words_from_the_embedded_model(tmp_path, capsys):
    captions = ["a red circle and a blue square", "a green triangle and a yellow square"]
    assert main(["demo", "--out", str(tmp_path), "--steps", "12", "--quiet", "--prompt", *captions]) == 0
    index = (tmp_path / "index.md").read_text()
    folders = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(folders) == 2
    for caption, folder in zip(captions, folders):
        assert f"## {caption}" in index and f"{folder.name}/token_heatmaps.png" in index
        for name in ("image.png", "index.json", "token_heatmaps.png", "evolution.gif", "report.md", "masks.png"):
            assert (folder / name).is_file(), (folder, name)
        assert caption in (folder / "report.md").read_text()
        scores = json.loads((folder / "grounding.json").read_text())
        assert set(scores) == set(caption.replace(" and", "").replace("a ", "").split())
        drawn = [s["iou"] for s in scores.values() if s["iou"] is not None]
        assert drawn and min(drawn) > 0.5, scores   # each word's mask lands on its object
        store = attncap.load(folder)
        assert {r.relation for r in store.records} == {"image->text", "image->image"}
        assert store.tokens["prompt"] == caption
    with pytest.raises(SystemExit):
        main(["demo", "--steps", "0"])
    assert "--steps" in capsys.readouterr().err


def test_budget_errors_name_the_flags_and_leave_no_empty_run_folder(model, capsys):
    out = model / "refused"
    argv = ["run", str(model / "tiny-sd"), "--prompt", PROMPT, "--prompt-embeds", str(model / "embeds.safetensors"),
            "--steps", "2", "--height", "32", "--width", "32", "--relations", "image->image", "--max-gib", "1e-7",
            "--quiet", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--max-gib" in err and "--pool" in err and "max_bytes" not in err and "pool=" not in err, err
    assert not out.exists() or not any(out.iterdir())


def test_demo_checks_its_captions_before_loading_anything(capsys, monkeypatch):
    import attncap.demo as demo

    monkeypatch.setattr(demo, "run", lambda *a, **k: pytest.fail("the demo ran with a bad caption"))
    assert main(["demo", "--prompt", "a red circle", "a purple star"]) == 2
    assert "does not know ['purple', 'star']" in capsys.readouterr().err
    assert main(["demo", "--prompt", "a red and a blue"]) == 2
    assert "names no '<colour> <shape>' object" in capsys.readouterr().err


@pytest.mark.parametrize("spelling", ["--out", "--output-dir", "--output_dir"])
def test_out_is_also_spelt_output_dir(spelling):
    from attncap.cli import build_parser

    for verb in (["run", "m", "--prompt", "x"], ["render", "d"], ["demo"], ["explore", "d"]):
        assert build_parser().parse_args([*verb, spelling, "somewhere"]).out == "somewhere"


def test_ctrl_c_keeps_a_store_that_loads_and_says_where(tmp_path):
    """SIGINT in the middle of a long run: exit 130, no traceback, the spilled records load."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "attncap.cli", "run", "shapes", "--prompt", "a red circle",
                             "--steps", "1000", "--no-render", "--quiet", "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:  # wait for a few spilled records
        logs = list(tmp_path.glob("*/index.jsonl"))
        if logs and logs[0].read_text().count('"record"') >= 3:
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    (run,) = list(tmp_path.iterdir())
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert f"kept in {run}" in err and f"attncap explore {run}" in err
    store = attncap.load(run)
    assert len(store) >= 3 and store.tokens["prompt"] == "a red circle"
    meta = json.loads((run / "run.json").read_text())
    assert meta["interrupted"] is True and meta["records"] == len(store)


def test_run_takes_the_embedded_model_by_name(tmp_path):
    assert main(["run", "shapes", "--prompt", "a red circle and a blue square", "--steps", "4", "--tree",
                 "--quiet", "--out", str(tmp_path)]) == 0
    (run,) = list(tmp_path.iterdir())
    meta = json.loads((run / "run.json").read_text())
    assert meta["pipeline"] == "ShapesPipeline" and meta["records"] > 0
    assert (run / "image.png").is_file() and (run / "words" / "circle_overlay.png").is_file()
    assert attncap.load(run).token_map("circle", size=(32, 32)).shape == (32, 32)
