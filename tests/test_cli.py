"""The ``ptq4vit`` command line end to end on tiny random-init models and the shared CIFAR-10 data."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import torch

from ptq4vit.harness.cli import main
from ptq4vit.harness.data import ImageFolder

from conftest import REPO

ROW_FIELDS = {"key", "model", "timm_name", "timm_tag", "weights", "preset", "overrides", "w_bits", "a_bits",
              "calib_size", "calib_seed", "calib_seconds", "float_top1", "quant_top1", "drop", "n_eval",
              "torch", "timm", "ptq4vit", "device", "world_size", "qparams"}


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _cli(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "ptq4vit", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_quantize_end_to_end(tiny_cli_args, tmp_path, capsys, cifar_dir):
    out = tmp_path / "runs"
    rc = main(["quantize", "--model", "vit_tiny_patch16_224", *tiny_cli_args, "--calib-size", "8",
               "--bits", "W6A6", "--preset", "base,ptq4vit", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    header = printed.splitlines()[0].split()
    assert header[:3] == ["model", "preset", "bits"] and "calib" in header
    table = printed.split("\n\n")[0].splitlines()
    assert len(table) == 4 and all(" W6A6 " in line for line in table[2:])
    rows = _rows(out / "results.jsonl")
    assert [r["preset"] for r in rows] == ["base", "ptq4vit"]
    for r in rows:
        assert ROW_FIELDS <= set(r)
        assert r["n_eval"] == 30 and r["calib_size"] == 8 and r["calib_seed"] == 3
        assert r["overrides"] == {"n_candidates": 10, "rounds": 1}
        assert abs(r["drop"] - (r["float_top1"] - r["quant_top1"])) < 1e-9
        assert 0 <= r["agreement"] <= 100 and r["kl"] >= 0
        # the float logits are kept once per evaluation set and give the float top-1
        float_logits = torch.load(out / "float_logits" / f"{r['float_key']}.pt", weights_only=True)
        targets = torch.tensor(ImageFolder(cifar_dir / "test", limit_per_class=3).targets)
        assert 100.0 * float((float_logits.argmax(-1) == targets).double().mean()) == r["float_top1"]
        q = json.loads(Path(r["qparams"]).read_text())
        assert q["w_bits"] == 6 and "blocks.0.attn.matmul2" in q["modules"]
    assert "split" in json.loads(Path(rows[1]["qparams"]).read_text())["modules"]["blocks.0.attn.matmul2"]
    # quantize again: the row is replaced, never duplicated
    assert main(["quantize", "--model", "vit_tiny_patch16_224", *tiny_cli_args, "--calib-size", "8",
                 "--w-bits", "6", "--a-bits", "6", "--preset", "base", "--out", str(out)]) == 0
    rows2 = _rows(out / "results.jsonl")
    assert len(rows2) == 2 and len({r["key"] for r in rows2}) == 2


def test_sweep_killed_and_resumed(tiny_cli_args, tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", "--models", "vit_tiny_patch16_224", *tiny_cli_args, "--presets", "base,ptq4vit",
            "--bits", "W8A8,W6A6,W4A4", "--calib-sizes", "8", "--out", str(out)]
    results = out / "results.jsonl"
    p = _cli(args)
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if results.exists() and len(_rows(results)) >= 2:
            break
        time.sleep(0.05)
    assert p.poll() is None, "the sweep finished before it could be killed: " + p.communicate()[1][-2000:]
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = _rows(results)
    assert 2 <= len(done) < 6
    # a killed writer's partial line must not break the resume
    with open(results, "a") as fh:
        fh.write('{"key": "partial-li')
    dry = subprocess.run([sys.executable, "-m", "ptq4vit", *args, "--dry-run"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert dry.returncode == 0, dry.stderr
    assert f"{len(done)} already in" in dry.stderr and len(dry.stdout.splitlines()) == 6 - len(done)
    # resume with two CPU workers
    assert main([*args, "--jobs", "2"]) == 0
    rows = _rows(results)
    keys = [r["key"] for r in rows]
    assert len(rows) == 6 and len(set(keys)) == 6
    assert keys[:len(done)] == [r["key"] for r in done]
    assert {(r["preset"], r["w_bits"]) for r in rows} == {(p, b) for p in ("base", "ptq4vit") for b in (8, 6, 4)}
    # the float accuracy is the same in every row (evaluated once, reused)
    assert len({r["float_top1"] for r in rows}) == 1
    # nothing left to do
    assert main(args) == 0
    assert len(_rows(results)) == 6


def test_sweep_runs_again_a_result_made_by_another_preset_definition(tiny_cli_args, tmp_path, capsys):
    out = tmp_path / "stale"
    args = ["sweep", "--models", "vit_tiny_patch16_224", *tiny_cli_args, "--presets", "base", "--bits", "W8A8",
            "--calib-sizes", "8", "--out", str(out)]
    results = out / "results.jsonl"
    assert main(args) == 0
    (row,) = _rows(results)
    assert row["preset_fields"]["name"] == "base" and row["preset_fields"]["n_candidates"] == 10
    # the same run key, stored when the preset defined a field otherwise
    edited = {**row, "preset_fields": {**row["preset_fields"], "metric": "mse"}, "quant_top1": -1.0}
    results.write_text(json.dumps(edited) + "\n")
    capsys.readouterr()
    assert main([*args, "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(row["key"]) and len(captured.out.splitlines()) == 1
    assert "another definition of preset 'base' (fields metric differ)" in captured.err
    assert main([*args, "--jobs", "2"]) == 0   # worker processes replace the stale row too
    (again,) = _rows(results)
    assert again["key"] == row["key"] and again["preset_fields"] == row["preset_fields"]
    assert again["quant_top1"] == row["quant_top1"]   # recomputed, bit-reproducibly, in place of the stale row
    # a row from before rows recorded their preset's fields cannot be checked: it counts as done
    legacy = {k: v for k, v in edited.items() if k != "preset_fields"}
    results.write_text(json.dumps(legacy) + "\n")
    assert main([*args, "--dry-run"]) == 0
    assert "1 already in" in capsys.readouterr().err


def test_ablation_and_report(tiny_cli_args, tmp_path, capsys, cifar_dir):
    out = tmp_path / "abl"
    rc = main(["ablation", "--models", "vit_tiny_patch16_224", *tiny_cli_args, "--rows", "1,6",
               "--bits", "W6A6", "--calib-sizes", "8", "--out", str(out)])
    assert rc == 0
    rows = _rows(out / "results.jsonl")
    assert sorted(r["ablation_row"] for r in rows) == [1, 6]
    r1 = next(r for r in rows if r["ablation_row"] == 1)
    assert r1["overrides"]["metric"] == "cosine" and r1["overrides"]["softmax_twin"] is False
    assert "row 1 (cosine, no twin)" in capsys.readouterr().out
    assert main(["ablation", "--models", "vit_tiny_patch16_224,ViT-B/224", "--data", str(cifar_dir),
                 "--val-split", "test", "--calib-dir", str(cifar_dir / "calib"), "--random-init",
                 "--out", str(out), "--dry-run"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 2 * 6 * 2
    # report: tables and both plots
    rep = tmp_path / "rep"
    assert main(["report", str(out / "results.jsonl"), "--out", str(rep), "--activations", "--layer", "0"]) == 0
    md = capsys.readouterr().out
    assert "## Ablation" in md and "cosine, no twin" in md and "hessian, both twins" in md
    pngs = sorted(p.name for p in rep.glob("*.png"))
    assert "accuracy_drop.png" in pngs and any(p.startswith("activations_") for p in pngs)
    assert (rep / "results.csv").read_text().count("\n") == 3


def _one_line_error(capsys, needle):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("ptq4vit: error:") and needle in err[0], err[0]


def _quant_args(tiny_cli_args, out, **replace):
    args = ["quantize", "--model", "vit_tiny_patch16_224", *tiny_cli_args, "--calib-size", "8", "--out", str(out)]
    for k, v in replace.items():
        i = args.index(k)
        args[i + 1] = v
    return args


def test_bad_input(tiny_cli_args, tmp_path, capsys, cifar_dir):
    out = tmp_path / "out"
    # missing root
    assert main(_quant_args(tiny_cli_args, out, **{"--data": str(tmp_path / "nowhere")})) == 2
    _one_line_error(capsys, str(tmp_path / "nowhere"))
    # root without val/ (the default split)
    args = _quant_args(tiny_cli_args, out)
    i = args.index("--val-split")
    del args[i:i + 2]
    assert main(args) == 2
    _one_line_error(capsys, "has no val/ folder")
    # empty class folder
    root = tmp_path / "data"
    for cls in ("airplane", "cat"):
        (root / "val" / cls).mkdir(parents=True)
    shutil.copy(next((cifar_dir / "test" / "cat").iterdir()), root / "val" / "cat")
    assert main(_quant_args(tiny_cli_args, out, **{"--data": str(root), "--val-split": "val"})) == 2
    _one_line_error(capsys, str(root / "val" / "airplane"))
    # unknown model
    assert main(_quant_args(tiny_cli_args, out, **{"--model": "ViT-Z/999"})) == 2
    _one_line_error(capsys, "ViT-Z/999")
    # bits outside 2..8
    for bits in ("W9A8", "W8A1", "W0A0"):
        assert main(_quant_args(tiny_cli_args, out) + ["--bits", bits]) == 2
        _one_line_error(capsys, bits)
    assert main(_quant_args(tiny_cli_args, out) + ["--w-bits", "12", "--a-bits", "8"]) == 2
    _one_line_error(capsys, "12")
    # unknown preset field
    assert main(_quant_args(tiny_cli_args, out) + ["--set", "colour=red"]) == 2
    _one_line_error(capsys, "colour")
    # unwritable output folder (a path under a regular file: fails even for root)
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    assert main(_quant_args(tiny_cli_args, blocker / "runs")) == 2
    _one_line_error(capsys, str(blocker / "runs"))
    # nothing was written anywhere
    assert not out.exists()
    # argparse errors are one line with status 2 too
    with pytest.raises(SystemExit) as e:
        main(["quantize", "--model"])
    assert e.value.code == 2
    _one_line_error(capsys, "--model")


def test_failed_run_leaves_results_intact(tiny_cli_args, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    results = out / "results.jsonl"
    results.write_text('{"key": "old", "model": "m"}\n')
    before = results.read_bytes()
    assert main(_quant_args(tiny_cli_args, out) + ["--bits", "W9A9"]) == 2
    assert main(_quant_args(tiny_cli_args, out, **{"--model": "nope_model"})) == 2
    assert results.read_bytes() == before


def test_models_command(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for short in ("ViT-S/224/32", "DeiT-Ti/224", "Swin-B/384", "ViT-S/14-CIFAR10"):
        assert short in out


def test_examples_are_thin_wrappers(capsys, monkeypatch):
    import runpy
    for name, cmd in (("test_all.py", "sweep"), ("test_ablation.py", "ablation")):
        monkeypatch.setattr(sys, "argv", [name, "--help"])
        with pytest.raises(SystemExit) as e:
            runpy.run_path(str(REPO / "examples" / name), run_name="__main__")
        assert e.value.code == 0 and f"ptq4vit {cmd}" in capsys.readouterr().out


def test_console_script_one_line_error(tmp_path):
    """The installed ``ptq4vit`` script (or ``python -m ptq4vit``): a bad root gives one line, status 2."""
    assert 'ptq4vit = "ptq4vit.harness.cli:main"' in (REPO / "pyproject.toml").read_text()
    exe = shutil.which("ptq4vit")
    local = Path(sys.executable).parent / "ptq4vit"
    cmd = [exe] if exe else [str(local)] if local.exists() else [sys.executable, "-m", "ptq4vit"]
    p = subprocess.run([*cmd, "quantize", "--model", "ViT-S/224", "--data", str(tmp_path / "missing"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [f"ptq4vit: error: data root {tmp_path / 'missing'} does not exist"]
    assert not (tmp_path / "o").exists()


def test_folders_without_a_root(cifar_dir, tmp_path, capsys):
    """--val-dir and --calib-dir alone (no --data): e.g. imagenet-sample, which has no train/."""
    assert main(["sweep", "--models", "vit_tiny_patch16_224", "--random-init", "--val-dir", str(cifar_dir / "test"),
                 "--calib-dir", str(cifar_dir / "calib"), "--presets", "base", "--bits", "W8A8,W4A4",
                 "--out", str(tmp_path), "--dry-run"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(["sweep", "--models", "vit_tiny_patch16_224", "--random-init", "--val-dir", str(cifar_dir / "test"),
                 "--out", str(tmp_path), "--dry-run"]) == 2
    _one_line_error(capsys, "--calib-dir")


def test_serial_sweep_records_a_failed_run_and_goes_on(tiny_cli_args, tmp_path, capsys, monkeypatch):
    """One run of a serial sweep fails: the others still run and are stored, the failure is listed, exit status 1."""
    from ptq4vit.errors import UserError
    from ptq4vit.harness.runner import Runner
    original_run = Runner.run

    def failing_run(self, job, **kw):
        if job.preset == "base" and job.w_bits == 6:
            raise RuntimeError("simulated crash in the middle of a sweep")
        if job.preset == "ptq4vit" and job.w_bits == 8:
            raise UserError("simulated bad input")
        return original_run(self, job, **kw)

    monkeypatch.setattr(Runner, "run", failing_run)
    out = tmp_path / "sweep"
    args = ["sweep", "--models", "vit_tiny_patch16_224", *tiny_cli_args, "--presets", "base,ptq4vit",
            "--bits", "W8A8,W6A6", "--calib-sizes", "8", "--out", str(out)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "2 of 4 runs failed" in err
    assert "vit_tiny_patch16_224 base n_candidates=10 rounds=1 W6A6 calib 8: RuntimeError: simulated crash in the middle of a sweep" in err
    assert "vit_tiny_patch16_224 ptq4vit n_candidates=10 rounds=1 W8A8 calib 8: simulated bad input" in err
    rows = _rows(out / "results.jsonl")
    assert {(r["preset"], r["w_bits"]) for r in rows} == {("base", 8), ("ptq4vit", 6)}
    # a rerun retries only the failed runs
    monkeypatch.setattr(Runner, "run", original_run)
    assert main(args) == 0
    assert {(r["preset"], r["w_bits"]) for r in _rows(out / "results.jsonl")} == {(p, b) for p in ("base", "ptq4vit")
                                                                                   for b in (8, 6)}
