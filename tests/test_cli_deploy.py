"""From a model to a deployed, re-checked int8 file on the command line alone: ``quantize --save``,
``deploy`` on ONNX Runtime and OpenVINO, ``eval`` of the exported file; the refusal of an int8
graph with no site in integers; eval's progress; bench's runtime labels."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import ptq4vit  # noqa: E402
from ptq4vit import checkpoint as ck  # noqa: E402
from ptq4vit.harness.cli import main  # noqa: E402

from conftest import FAST_OVERRIDES, SHARED, TINY_VIT_KWARGS, missing_shared  # noqa: E402
from test_export import saved_vit_and_images  # noqa: E402

MODEL = "vit_tiny_patch16_224"
RUNTIMES = ["onnxruntime", pytest.param("openvino", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("openvino") is None, reason="openvino is not installed"))]


def _cifar() -> Path:
    d = SHARED / "data" / "cifar10"
    if not (d / "test").is_dir() or not (d / "calib").is_dir():
        missing_shared(f"{d} (test/ and calib/)")
    return d


def _quantize_args(cifar: Path, out: Path) -> list:
    return ["quantize", "--model", MODEL, "--model-kwargs", json.dumps(TINY_VIT_KWARGS), "--random-init",
            "--data", str(cifar), "--val-split", "test", "--calib-dir", str(cifar / "calib"), "--limit", "3",
            "--workers", "0", "--no-progress", *FAST_OVERRIDES, "--calib-size", "8", "--out", str(out)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``quantize --save FILE`` of one run: (checkpoint, the run's results row, cifar folder)."""
    cifar = _cifar()
    tmp = tmp_path_factory.mktemp("deploy")
    ckpt = tmp / "models" / "q.safetensors"
    assert main(_quantize_args(cifar, tmp / "runs") + ["--save", str(ckpt)]) == 0
    row = json.loads((tmp / "runs" / "results.jsonl").read_text().splitlines()[0])
    return ckpt, row, cifar


def _table_row(printed: str, label: str) -> list:
    line = next(ln for ln in printed.splitlines() if ln.strip().startswith(label))
    return line[line.index(")") + 1:].split()


def _eval_top1(args: list, capsys) -> str:
    assert main(["eval", *args, "--no-progress"]) == 0
    return re.search(r": top-1 ([\d.]+)% on 30 images", capsys.readouterr().out).group(1)


def test_quantize_save_writes_a_checkpoint_that_loads(saved):
    ckpt, row, _ = saved
    assert row["checkpoint"] == str(ckpt)
    q = ptq4vit.load(ckpt)
    assert (q.name.split(".")[0], q.preset.name, q.w_bits, q.a_bits) == (MODEL, "ptq4vit", 8, 8)
    assert ck.read_metadata(ckpt)["data_config"]["input_size"] == [3, 32, 32]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_deploy_rechecks_the_exported_file_as_eval_sees_it(saved, runtime, tmp_path, capsys):
    ckpt, _, cifar = saved
    out, fout = tmp_path / "q.onnx", tmp_path / "f.onnx"
    data = ["--data-dir", str(cifar / "test"), "--limit", "3", "--batch-size", "16"]
    assert main(["deploy", str(ckpt), "--runtime", runtime, "--out", str(out), "--float-out", str(fout), *data,
                 "--repeats", "2", "--threads", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    label = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}[runtime]
    fmt = {"onnxruntime": "contrib", "openvino": "qdq"}[runtime]
    assert printed.startswith(f"{out}: int8 ONNX ({fmt}) on {label} (")
    # every site placed: 5 linears and 2 attention matmuls in integers, the float-image patch embedding float
    assert "where the sites run: 7 of 8 in integers, 1 in float" in printed
    table = [ln.split() for ln in printed.splitlines()[2:6]]
    assert table == [["site", "kind", "integer", "float"], ["conv", "0", "1"], ["linear", "5", "0"],
                     ["matmul", "2", "0"]]
    int8, flt = _table_row(printed, "int8 ("), _table_row(printed, "float32 (")
    assert flt[1:3] == ["100.00", "0.0000"]
    # the exported files, run by eval on the same runtime, give the top-1 deploy printed
    ov = ["--openvino", "f32"] if runtime == "openvino" else []
    data = ["--checkpoint", str(ckpt), *data]
    assert _eval_top1([*data, "--onnx", str(out), *ov], capsys) == int8[0]
    assert _eval_top1([*data, "--onnx", str(fout), *ov], capsys) == flt[0]
    # and the agreement deploy printed is that of the two files' predictions on those images
    from ptq4vit.harness.data import ImageFolder, eval_transform
    from ptq4vit.export.ort import make_session
    ds = ImageFolder(cifar / "test", eval_transform(ck.data_config(ck.read_metadata(ckpt))), limit_per_class=3)
    x = np.stack([ds[i][0].numpy() for i in range(len(ds))])
    if runtime == "openvino":
        from ptq4vit.export.openvino import compile_onnx
        q_out, f_out = compile_onnx(out, "f32").run(x), compile_onnx(fout, "f32").run(x)
    else:
        q_out, f_out = (make_session(str(p)).run(None, {"input": x})[0] for p in (out, fout))
    assert int8[1] == f"{100.0 * np.mean(q_out.argmax(1) == f_out.argmax(1)):.2f}"


def test_save_with_several_runs_names_each_checkpoint_in_a_folder(tmp_path, capsys):
    cifar = _cifar()
    args = _quantize_args(cifar, tmp_path / "runs") + ["--preset", "base,ptq4vit", "--bits", "W8A8"]
    # a file where a folder is needed: one line, exit 2, before any calibration
    (tmp_path / "taken").write_text("")
    assert main(args + ["--save", str(tmp_path / "taken")]) == 2
    assert capsys.readouterr().err == (f"ptq4vit: error: --save {tmp_path / 'taken'} is a file, but 2 runs need a "
                                       "folder (one checkpoint per run)\n")
    assert not (tmp_path / "runs").exists()
    assert main(args + ["--save", str(tmp_path / "taken" / "ckpts")]) == 2
    assert capsys.readouterr().err == (f"ptq4vit: error: cannot write in --save folder {tmp_path / 'taken' / 'ckpts'}: "
                                       f"{tmp_path / 'taken'} is not a folder\n")
    assert not (tmp_path / "runs").exists()
    assert main(args + ["--save", str(tmp_path / "ckpts")]) == 0
    rows = [json.loads(ln) for ln in (tmp_path / "runs" / "results.jsonl").read_text().splitlines()]
    names = sorted(p.name for p in (tmp_path / "ckpts").iterdir())
    assert names == sorted(f"vit-tiny-patch16-224_{r['preset']}_W8A8_c8_s3_{r['key'][:8]}.safetensors" for r in rows)
    assert names == sorted(Path(r["qparams"]).stem + ".safetensors" for r in rows)
    for r in rows:
        assert ptq4vit.load(r["checkpoint"]).preset.name == r["preset"]
    assert [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("checkpoint: ")] == \
        [f"checkpoint: {r['checkpoint']}" for r in rows]


def test_sweep_save_writes_a_checkpoint_per_run_it_makes(tmp_path):
    cifar = _cifar()
    args = _quantize_args(cifar, tmp_path / "runs")[1:]
    args[args.index("--model")] = "--models"
    args[args.index("--calib-size")] = "--calib-sizes"
    assert main(["sweep", *args, "--presets", "ptq4vit", "--bits", "W8A8", "--save", str(tmp_path / "ckpts")]) == 0
    row = json.loads((tmp_path / "runs" / "results.jsonl").read_text())
    assert [p.name for p in (tmp_path / "ckpts").iterdir()] == [Path(row["qparams"]).stem + ".safetensors"]
    assert row["checkpoint"] == str(tmp_path / "ckpts" / (Path(row["qparams"]).stem + ".safetensors"))


def test_save_path_is_checked_before_calibrating(tmp_path, capsys):
    cifar = _cifar()
    (tmp_path / "afile").write_text("")
    bad = tmp_path / "afile" / "q.safetensors"
    assert main(_quantize_args(cifar, tmp_path / "runs") + ["--save", str(bad)]) == 2
    assert capsys.readouterr().err == f"ptq4vit: error: cannot write --save file {bad}: {bad.parent} is not a folder\n"
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def repq_checkpoint(tmp_path_factory):
    """A tiny repq-vit checkpoint: no site of it has an integer lowering."""
    import timm
    import torch
    torch.manual_seed(0)
    m = timm.create_model(MODEL, pretrained=False, **TINY_VIT_KWARGS).eval()
    q = ptq4vit.quantize(m, torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)), "repq-vit",
                         progress=False)
    path = tmp_path_factory.mktemp("repq") / "repq.safetensors"
    ck.save(q, path, data_config={"input_size": (3, 32, 32), "interpolation": "bicubic", "crop_pct": 1.0,
                                  "crop_mode": "squash", "mean": (0.5,) * 3, "std": (0.5,) * 3})
    return path


REFUSAL = ("ptq4vit: error: no quantization site of vit_tiny_patch16_224.augreg_in21k_ft_in1k (repq-vit W8A8) would run "
           "in integers in the {fmt} graph: all 8 stay float (1 conv, 5 linear, 2 matmul); pass --allow-float to write "
           "it anyway\n")


def test_export_refuses_a_graph_without_integer_sites_unless_allowed(repq_checkpoint, tmp_path, capsys):
    out = tmp_path / "q.onnx"
    assert main(["export", "--checkpoint", str(repq_checkpoint), "--out", str(out), "--check", "0"]) == 2
    assert capsys.readouterr().err == REFUSAL.format(fmt="contrib") and not out.exists()
    assert main(["export", "--checkpoint", str(repq_checkpoint), "--out", str(out), "--check", "0",
                 "--allow-float"]) == 0
    assert "  0/8 quantization sites run as integer matmuls; 8 stay float (1 conv, 5 linear, 2 matmul)" \
        in capsys.readouterr().out.splitlines()
    assert out.is_file()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_deploy_refuses_a_graph_without_integer_sites_unless_allowed(repq_checkpoint, runtime, tmp_path, capsys):
    cifar = _cifar()
    out = tmp_path / "q.onnx"
    args = ["deploy", str(repq_checkpoint), "--runtime", runtime, "--out", str(out), "--data-dir",
            str(cifar / "test"), "--limit", "1", "--repeats", "1", "--no-progress", "--no-torch"]
    assert main(args) == 2
    fmt = {"onnxruntime": "contrib", "openvino": "qdq"}[runtime]
    assert capsys.readouterr().err == REFUSAL.format(fmt=fmt) and not out.exists()
    assert main(args + ["--allow-float"]) == 0
    assert "where the sites run: 0 of 8 in integers, 8 in float" in capsys.readouterr().out


def test_partly_float_export_says_which_kinds_stay_float(tmp_path, capsys):
    ckpt, _ = saved_vit_and_images(tmp_path, 1)
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "q.onnx"), "--check", "0"]) == 0
    assert "  13/14 quantization sites run as integer matmuls; 1 stays float (1 conv)" \
        in capsys.readouterr().out.splitlines()


def test_eval_shows_progress_unless_asked_not_to(tmp_path, capsys):
    ckpt, data = saved_vit_and_images(tmp_path, 2)
    args = ["eval", "--checkpoint", str(ckpt), "--data-dir", str(data)]
    assert main(args) == 0
    assert re.search(r"eval: 100%\|.*\| 4/4 ", capsys.readouterr().err)
    for quiet in (args + ["--no-progress"], ["-q", *args]):
        assert main(quiet) == 0
        assert "eval:" not in capsys.readouterr().err


@pytest.mark.skipif(__import__("importlib").util.find_spec("openvino") is None, reason="openvino is not installed")
def test_bench_labels_each_runtime_and_profiles_only_onnx_runtime_graphs(tmp_path, capsys):
    ckpt, data = saved_vit_and_images(tmp_path, 1)
    assert main(["bench", "--checkpoint", str(ckpt), "--batch-sizes", "1", "--repeats", "1", "--threads", "1",
                 "--providers", "cpu", "--no-torch", "--openvino", "f32", "--profile",
                 "--json", str(tmp_path / "b.json")]) == 0
    printed = capsys.readouterr().out.splitlines()
    rows = {ln.split()[-4]: ln.split()[:-4] for ln in printed if re.search(r"-(onnx|openvino) +[\d.]+ +[\d.]+ +[\d.]+$", ln)}
    assert rows == {"float32-onnx": ["ONNX", "Runtime", "CPUExecutionProvider", "1"],
                    "int8-onnx": ["ONNX", "Runtime", "CPUExecutionProvider", "1"],
                    "float32-openvino": ["OpenVINO", "CPU", "1"], "int8-openvino": ["OpenVINO", "CPU", "1"]}
    assert [ln for ln in printed if ln.startswith("where the time goes")] == [
        "where the time goes, float32-onnx on ONNX Runtime (CPUExecutionProvider), batch 1:",
        "where the time goes, int8-onnx on ONNX Runtime (CPUExecutionProvider), batch 1:"]
    b = json.loads((tmp_path / "b.json").read_text())
    assert set(b["ratios"]) == {"CPUExecutionProvider:1"} and b["openvino_ratios"]["1"] is not None


# --------------------------------------------------------------------------- the float model deploy compares with

FLOAT_ARGS = ["--model", MODEL, "--model-kwargs", json.dumps(TINY_VIT_KWARGS), "--random-init"]
ORIGINAL = (f"float32: --model {MODEL} (random init, seed 0), the float model the checkpoint was quantized from "
            "(its weights' digest checked)")
DEQUANTIZED = ("float32: the checkpoint's model with its quantizers off (weights dequantized from their codes), not the "
               "original float weights; to compare with the original, pass the float model as quantize was given it "
               "(--model NAME and --weights PATH, or --random-init --init-seed N; --model-kwargs JSON)")


def _deploy(ckpt, cifar, tmp_path, *extra) -> tuple:
    """``deploy`` on ONNX Runtime over the images quantize evaluated: (printed lines, the float32 file's logits)."""
    from ptq4vit.export.ort import make_session
    fout = tmp_path / f"f{len(list(tmp_path.iterdir()))}.onnx"
    assert main(["deploy", str(ckpt), "--out", str(tmp_path / "q.onnx"), "--float-out", str(fout), "--data-dir",
                 str(cifar / "test"), "--limit", "3", "--repeats", "1", "--threads", "1", "--no-progress", *extra]) == 0
    return fout, make_session(str(fout)).run(None, {"input": _images_of(ckpt, cifar)})[0]


def _images_of(ckpt, cifar) -> np.ndarray:
    from ptq4vit.harness.data import ImageFolder, eval_transform
    ds = ImageFolder(cifar / "test", eval_transform(ck.data_config(ck.read_metadata(ckpt))), limit_per_class=3)
    return np.stack([ds[i][0].numpy() for i in range(len(ds))])


def test_deploy_compares_with_the_float_model_it_is_given(saved, tmp_path, capsys):
    ckpt, row, cifar = saved
    fout, _ = _deploy(ckpt, cifar, tmp_path, *FLOAT_ARGS)
    printed = capsys.readouterr().out
    assert printed.splitlines()[-1] == ORIGINAL
    # the float32 graph is the float model quantize evaluated: its top-1 on the same images is quantize's, and the
    # fake-quantized torch model's agreement and KL against it are the ones quantize recorded
    flt, torch_row = _table_row(printed, "float32 ("), _table_row(printed, "fake-quant torch (")
    assert flt[0] == f"{row['float_top1']:.2f}"
    assert torch_row[1:3] == [f"{row['agreement']:.2f}", f"{row['kl']:.4f}"]
    assert row["agreement"] < 100.0  # (against the dequantized model it agrees on every image)
    # eval takes the float32 file as the checkpoint's (it records the float weights) and gives the same top-1
    assert _eval_top1(["--checkpoint", str(ckpt), "--data-dir", str(cifar / "test"), "--limit", "3",
                       "--onnx", str(fout)], capsys) == flt[0]


def test_deploy_refuses_a_float_model_the_checkpoint_was_not_quantized_from(saved, tmp_path, capsys):
    from ptq4vit.harness import zoo
    ckpt, _, cifar = saved
    out = tmp_path / "new" / "q.onnx"
    assert main(["deploy", str(ckpt), "--out", str(out), "--data-dir", str(cifar / "test"), "--limit", "1",
                 "--no-progress", *FLOAT_ARGS, "--init-seed", "1"]) == 2
    other = zoo.create(MODEL, pretrained=False, model_kwargs=TINY_VIT_KWARGS, init_seed=1).model
    recorded, got = ck.read_metadata(ckpt)["float_weights_sha256"], ck.float_weights_digest(other)
    assert capsys.readouterr().err == (
        f"ptq4vit: error: --model {MODEL} (random init, seed 1) is not the float model the checkpoint {ckpt} was "
        f"quantized from: its float weights sha256 is {got[:16]}..., the checkpoint {ckpt} records {recorded[:16]}...\n")
    assert not (tmp_path / "new").exists()
    # an option that describes the float model needs the model's name
    assert main(["deploy", str(ckpt), "--out", str(out), "--data-dir", str(cifar / "test"), "--random-init"]) == 2
    assert capsys.readouterr().err == "ptq4vit: error: --random-init describe the float model: give --model NAME too\n"


@pytest.fixture(scope="module")
def rotq_saved(tmp_path_factory):
    """``quantize --preset rotq --save``: a checkpoint whose weights are rotated and GPTQ-rounded."""
    cifar = _cifar()
    tmp = tmp_path_factory.mktemp("rotq")
    ckpt = tmp / "r.safetensors"
    args = _quantize_args(cifar, tmp / "runs")
    args = args[:args.index("--set")] + args[args.index("--calib-size"):]  # rotq has no search fields to shorten
    assert main(args + ["--preset", "rotq", "--save", str(ckpt)]) == 0
    return ckpt, json.loads((tmp / "runs" / "results.jsonl").read_text()), cifar


def test_deploy_of_rewritten_weights_compares_with_the_original_only_when_given_it(rotq_saved, tmp_path, capsys):
    import torch
    from ptq4vit.harness import zoo
    ckpt, row, cifar = rotq_saved
    _, dequantized = _deploy(ckpt, cifar, tmp_path)
    assert capsys.readouterr().out.splitlines()[-1] == DEQUANTIZED
    _, original = _deploy(ckpt, cifar, tmp_path, *FLOAT_ARGS)
    printed = capsys.readouterr().out
    assert printed.splitlines()[-1] == ORIGINAL
    assert _table_row(printed, "float32 (")[0] == f"{row['float_top1']:.2f}"
    # with the option the float32 file computes the original float model (as close as float rounding allows);
    # without it, of the rotated and rounded weights: logits over a hundred times further off
    m = zoo.create(MODEL, pretrained=False, model_kwargs=TINY_VIT_KWARGS).model
    with torch.no_grad():
        ref = m(torch.from_numpy(_images_of(ckpt, cifar))).numpy()
    assert np.abs(original - ref).max() < 1e-6
    assert np.abs(dequantized - ref).max() > 1e-4
