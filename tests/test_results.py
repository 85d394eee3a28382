"""The results JSONL (partial lines, keys, concurrent appends) and the report tables and plots."""
import csv
import json
import multiprocessing as mp

import pytest
import torch

from ptq4vit.harness import paper, plots, report, store
from ptq4vit.errors import UserError


def _row(key, **kw):
    base = dict(key=key, model="ViT-S/224", timm_name="vit_small_patch16_224", weights="hub", preset="ptq4vit",
                overrides={}, ablation_row=None, w_bits=6, a_bits=6, calib_size=32, calib_seed=3,
                eval_dir="/imagenet/val", calib_dir="/imagenet/train", limit_per_class=None, n_eval=50000,
                float_top1=81.4, quant_top1=78.0, drop=3.4, calib_seconds=12.0, device="cpu")
    base.update(kw)
    return base


def test_append_and_keys(tmp_path):
    f = store.ResultsFile(tmp_path / "r.jsonl")
    assert f.rows() == [] and f.by_key() == {}
    assert f.append(_row("a"))
    assert f.append(_row("b"))
    assert not f.append(_row("a", quant_top1=1.0))  # never duplicated
    assert [r["key"] for r in f.rows()] == ["a", "b"]
    assert f.append(_row("a", quant_top1=1.0), replace=True)
    rows = f.rows()
    assert [r["key"] for r in rows] == ["b", "a"] and rows[-1]["quant_top1"] == 1.0
    assert list(f.by_key()) == ["b", "a"] and f.by_key()["a"]["quant_top1"] == 1.0
    assert f.path.read_text().count("\n") == 2


def test_partial_last_line_is_ignored_then_cut(tmp_path):
    f = store.ResultsFile(tmp_path / "r.jsonl")
    f.append(_row("a"))
    with open(f.path, "ab") as fh:
        fh.write(json.dumps(_row("b")).encode()[:40])  # a writer killed mid-line
    assert [r["key"] for r in f.rows()] == ["a"]
    f.append(_row("c"))
    lines = f.path.read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["a", "c"]


def test_complete_last_line_without_newline_is_kept(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps(_row("a")) + "\n" + json.dumps(_row("b")))
    f = store.ResultsFile(p)
    assert [r["key"] for r in f.rows()] == ["a", "b"]
    f.append(_row("c"))
    assert [json.loads(line)["key"] for line in p.read_text().splitlines()] == ["a", "b", "c"]


def _appender(path, prefix, n):
    f = store.ResultsFile(path)
    for i in range(n):
        f.append(_row(f"{prefix}{i}", pad="x" * 5000))


def test_concurrent_appends(tmp_path):
    path = tmp_path / "r.jsonl"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_appender, args=(path, p, 40)) for p in "xyz"]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    keys = [json.loads(line)["key"] for line in path.read_text().splitlines()]
    assert len(keys) == 120 and len(set(keys)) == 120


def test_run_key_stable():
    a = store.run_key({"b": 1, "a": {"y": 2, "x": 1}})
    assert a == store.run_key({"a": {"x": 1, "y": 2}, "b": 1}) and len(a) == 20


def test_ensure_writable_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot create output folder"):
        store.ensure_writable_dir(tmp_path / "file" / "sub")
    assert store.ensure_writable_dir(tmp_path / "new" / "deep").is_dir()


def test_paper_numbers():
    assert paper.paper_top1("ViT-S/224") == 81.39
    assert paper.paper_top1("Swin-B/384", "PTQ4ViT", "W6A6") == 85.388
    assert paper.paper_top1("DeiT-B/384", "base", "W8A8") == 82.33
    assert paper.paper_top1("ViT-S/224", "base", "W4A4") is None
    assert paper.paper_top1("vit_s14_cifar10") is None


def test_report_tables_and_plot(tmp_path):
    rows = [
        _row("1", preset="base", quant_top1=70.0, drop=11.4),
        _row("2", preset="ptq4vit", quant_top1=78.5, drop=2.9),
        _row("3", preset="ptq4vit", w_bits=8, a_bits=8, quant_top1=81.0, drop=0.4),
        _row("4", model="DeiT-S/224", float_top1=79.8, preset="base", quant_top1=72.0, drop=7.8),
        _row("5", model="vit_tiny_patch16_224", weights="random-init", float_top1=10.0, quant_top1=9.0, drop=1.0),
        _row("6", preset="ptq4vit", ablation_row=3, overrides={"softmax_twin": True, "gelu_twin": False},
             quant_top1=75.0, drop=6.4),
    ]
    written = report.write_report(rows, tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| ViT-S/224 | 81.40 (81.39) | 70.00 (70.24) |" in md  # base W6A6 beside the paper's 70.244
    assert "78.50 (78.63)" in md and "81.00 (81.00)" in md
    assert "| vit_tiny_patch16_224 | 10.00 |" in md  # no paper number for random weights
    assert "## Ablation" in md and "hessian, softmax twin" in md
    with open(written["main_table"]) as fh:
        table = list(csv.DictReader(fh))
    vit = next(r for r in table if r["model"] == "ViT-S/224")
    assert float(vit["ptq4vit W6A6"]) == 78.5 and float(vit["ptq4vit W6A6 paper"]) == 78.63
    with open(written["csv"]) as fh:
        long = list(csv.DictReader(fh))
    assert len(long) == 6
    assert abs(float(next(r for r in long if r["key"] == "2")["vs_paper"]) - (78.5 - 78.63)) < 1e-9
    assert next(r for r in long if r["key"] == "6")["paper_top1"] == ""
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert {"main", "ablation"} <= set(data["tables"])
    png = written["accuracy_drop"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_variants_beside_their_preset(tmp_path):
    rows = [
        _row("1", preset="rotq", quant_top1=70.4, agreement=91.4, kl=0.0466),
        _row("2", preset="rotq", overrides={"rotate_heads": False}, quant_top1=68.4, agreement=87.8, kl=0.0721),
        _row("3", preset="rotq", overrides={"head_bits": 0, "softmax_renorm": False}, quant_top1=69.0, agreement=90.0,
             kl=0.05),
        _row("4", preset="rotq", w_bits=4, a_bits=4, overrides={"rotate_heads": False}, quant_top1=49.1,
             agreement=53.3, kl=0.9),   # no rotq W4A4 as is: left out
        _row("5", preset="ptq4vit", quant_top1=59.9, agreement=69.9, kl=0.392),
    ]
    header, table = report.variants_table(rows)
    assert header[2:6] == ["variant", "bits", "top-1", "agreement %"]
    assert [line[2:4] for line in table] == [["(as is)", "W6A6"], ["no head rotation", "W6A6"],
                                            ["head_bits=0, softmax_renorm=False", "W6A6"]]
    assert table[0][7] is None and table[1][7] == pytest.approx(87.8 - 91.4) and table[1][6] == "0.0721"
    written = report.write_report(rows, tmp_path / "rep", plots=False)
    assert "| ViT-S/224 | rotq | no head rotation | W6A6 | 68.40 | 87.80 | 0.0721 | -3.60 |" in \
        (tmp_path / "rep" / "report.md").read_text()
    assert len(written["variants_table"].read_text().splitlines()) == 4


def test_report_needs_rows(tmp_path):
    with pytest.raises(UserError, match="no results"):
        report.write_report([], tmp_path)


def test_grids():
    g, s = plots.softmax_grid({"split": 2 ** -4}, 4)  # qmax 8: Δ1 = s/7, Δ2 = 1/7
    assert s == 2 ** -4 and g[0] == 0 and abs(g[-1] - 1.0) < 1e-12
    assert all(x < s for x in g[:7]) and all(x >= s for x in g[7:])
    g, s = plots.softmax_grid({"a_scale": [0.1, 0.2]}, 4)
    assert s is None and len(g) == 8 and g[1] == 0.1
    gg = plots.gelu_grid({"a_scale": [0.5], "a_neg_scale": 0.02}, 4)
    assert gg[0] == -8 * 0.02 and gg[-1] == 7 * 0.5 and len(gg) == 16
    assert plots.gelu_grid({"a_scale": [0.5]}, 4) == [k * 0.5 for k in range(-8, 8)]


@pytest.mark.parametrize("twin", [True, False])
def test_activation_plot(tmp_path, twin):
    import timm
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              embed_dim=48, num_heads=2, num_classes=10).eval()
    images = torch.randn(4, 3, 32, 32)
    probs, gelu = plots.capture_block_activations(model, images, "blocks.1")
    assert probs.shape == (4, 2, 17, 17) and torch.allclose(probs.sum(-1), torch.ones(4, 2, 17))
    assert gelu.numel() == 4 * 17 * 192 and gelu.min() > -0.18
    assert model.blocks[1].attn.fused_attn == timm.layers.use_fused_attn()  # restored
    m2 = {"kind": "matmul", "split": 2 ** -5, "b_scale": [0.1, 0.1]} if twin else \
        {"kind": "matmul", "a_scale": [0.01, 0.02], "b_scale": [0.1, 0.1]}
    f2 = {"kind": "linear", "w_scale": [0.01], "a_scale": [0.05]}
    if twin:
        f2["a_neg_scale"] = 0.17 / 32
    q = {"model": "tiny", "preset": "x", "w_bits": 6, "a_bits": 6,
         "modules": {"blocks.1.attn.matmul2": m2, "blocks.1.mlp.fc2": f2}}
    out = plots.plot_activations(model, images, q, tmp_path / "act.png", layer="-1")
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(UserError, match="no blocks.0.attn.matmul2"):
        plots.plot_activations(model, images, q, tmp_path / "x.png", layer="blocks.0")
    with pytest.raises(UserError, match="no block 'blocks.9'"):
        plots.find_block(model, "blocks.9")
