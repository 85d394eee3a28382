"""torchrun on CPU (gloo): sharded evaluation and the quantize command give the single-process results."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from ptq4vit.harness import zoo
from ptq4vit.harness.data import ImageFolder
from ptq4vit.harness.evaluate import evaluate

from conftest import REPO, TINY_VIT_KWARGS

SCRIPT = textwrap.dedent("""
    import json, sys
    from ptq4vit.harness import zoo
    from ptq4vit.harness.data import ImageFolder
    from ptq4vit.harness.evaluate import dist_info, evaluate, init_distributed, shutdown_distributed
    dev = init_distributed("cpu")
    rank, world = dist_info()
    lm = zoo.create("vit_tiny_patch16_224", pretrained=False, model_kwargs=json.loads(sys.argv[2]), init_seed=4)
    ds = ImageFolder(sys.argv[1], lm.transform())
    r = evaluate(lm.model, ds, batch_size=3, device=dev, progress=rank == 0, return_predictions=True)
    with open(sys.argv[3] + f".{rank}", "w") as f:
        json.dump(dict(correct=r.correct, total=r.total, skipped=r.skipped, skipped_paths=r.skipped_paths,
                       predictions=r.predictions, world=r.world_size), f)
    shutdown_distributed()
""")


def _torchrun(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture
def uneven_folder(cifar_dir, tmp_path):
    """11 readable images in 3 classes plus one unreadable: shards of unequal size."""
    root = tmp_path / "data"
    for cls, n in (("airplane", 4), ("bird", 3), ("truck", 4)):
        (root / cls).mkdir(parents=True)
        for f in sorted((cifar_dir / "test" / cls).iterdir())[:n]:
            shutil.copy(f, root / cls / f.name)
    (root / "bird" / "0000_broken.jpg").write_bytes(b"\x89PNG broken")
    return root


def test_two_process_evaluation_equals_single(uneven_folder, tmp_path):
    script = tmp_path / "eval.py"
    script.write_text(SCRIPT)
    out = tmp_path / "res.json"
    p = _torchrun([str(script), str(uneven_folder), json.dumps(TINY_VIT_KWARGS), str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    r0 = json.loads((tmp_path / "res.json.0").read_text())
    r1 = json.loads((tmp_path / "res.json.1").read_text())
    assert r0 == r1 and r0["world"] == 2

    lm = zoo.create("vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY_VIT_KWARGS, init_seed=4)
    ds = ImageFolder(uneven_folder, lm.transform())
    single = evaluate(lm.model, ds, batch_size=5, progress=False, return_predictions=True)
    assert (r0["correct"], r0["total"], r0["skipped"]) == (single.correct, single.total, single.skipped)
    assert r0["total"] + r0["skipped"] == len(ds) == 12
    assert r0["predictions"] == single.predictions
    assert r0["skipped_paths"] == single.skipped_paths


def test_torchrun_quantize_equals_single_process(tiny_cli_args, tmp_path):
    args = ["quantize", "--model", "vit_tiny_patch16_224", *tiny_cli_args, "--calib-size", "8",
            "--bits", "W6A6", "--preset", "ptq4vit", "--device", "cpu"]
    from ptq4vit.harness.cli import main
    assert main(args + ["--out", str(tmp_path / "single")]) == 0
    p = _torchrun(["-m", "ptq4vit", *args, "--out", str(tmp_path / "dist")])
    assert p.returncode == 0, p.stderr[-3000:]
    single = [json.loads(line) for line in (tmp_path / "single" / "results.jsonl").read_text().splitlines()]
    dist = [json.loads(line) for line in (tmp_path / "dist" / "results.jsonl").read_text().splitlines()]
    assert len(single) == len(dist) == 1
    s, d = single[0], dist[0]
    assert d["world_size"] == 2 and s["world_size"] == 1
    for k in ("key", "n_eval", "float_top1", "quant_top1"):
        assert s[k] == d[k], k
    assert json.loads(open(s["qparams"]).read()) == json.loads(open(d["qparams"]).read())
    assert "vit_tiny_patch16_224" in p.stdout  # rank 0 printed the table once
    assert p.stdout.count("quant top-1") == 1
