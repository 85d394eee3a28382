"""torchrun on CPU (gloo): sharded evaluation and the quantize command give the single-process results."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

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

# Each rank calibrates rotq (rotations folded, GPTQ-rounded weights, bias correction) on slightly different
# images, as ranks whose arithmetic differs would; rank 1 also changes an online rotation's buffer. Then
# sync_model; then rank 1 changes one weight element and the digest check runs; then rank 1 adds a buffer.
SYNC_SCRIPT = textwrap.dedent("""
    import json, sys, torch, timm, ptq4vit
    from ptq4vit.errors import UserError
    from ptq4vit.harness.evaluate import dist_info, init_distributed, shutdown_distributed
    from ptq4vit.harness.runner import check_same_model, sync_model
    init_distributed("cpu")
    rank, world = dist_info()
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **json.loads(sys.argv[2])).eval()
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    images = images + 1e-3 * rank * torch.randn(images.shape, generator=torch.Generator().manual_seed(2))
    q = ptq4vit.quantize(model, images, "rotq", 6, 6, n_candidates=10, rounds=1, progress=False)
    state = lambda: {k: v.detach().clone() for k, v in [*q.named_parameters(), *q.named_buffers()]}
    with torch.no_grad():
        q.model.blocks[0].mlp.norm.left.mul_(1 + rank)
    before = state()
    sync_model(q)
    after = state()
    errors = {}
    with torch.no_grad():
        q.model.blocks[0].attn.proj.weight[0, 0] += rank * 1e-6
    try:
        check_same_model(q)
    except RuntimeError as e:
        errors["digest"] = str(e)
    if rank == 1:
        q.model.register_buffer("extra", torch.zeros(2))
    try:
        sync_model(q)
    except UserError as e:
        errors["layout"] = str(e)
    torch.save(dict(before=before, after=after, errors=errors), sys.argv[1] + f".{rank}")
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


@pytest.fixture(scope="module")
def synced(tmp_path_factory):
    """What each of two gloo ranks held before and after sync_model, and the errors of the two checks."""
    tmp = tmp_path_factory.mktemp("sync")
    script = tmp / "sync.py"
    script.write_text(SYNC_SCRIPT)
    p = _torchrun([str(script), str(tmp / "state"), json.dumps(TINY_VIT_KWARGS)])
    assert p.returncode == 0, p.stderr[-3000:]
    return [torch.load(tmp / f"state.{r}", weights_only=True) for r in (0, 1)]


def test_sync_model_gives_every_rank_rank_0s_whole_model(synced):
    r0, r1 = synced
    differ = {k for k in r0["before"] if not torch.equal(r0["before"][k], r1["before"][k])}
    # the ranks did calibrate different models: weights and biases rewritten by GPTQ and bias correction,
    # the online rotation, and not only the quantizers' scales
    assert {"model.blocks.0.mlp.fc1.weight", "model.blocks.0.mlp.fc1.bias", "model.head.bias"} <= differ
    assert "model.blocks.0.mlp.norm.left" in differ
    for r in (r0, r1):
        assert r["after"].keys() == r0["before"].keys()
        for k, t in r0["before"].items():
            assert r["after"][k].dtype == t.dtype and torch.equal(r["after"][k], t), k


def test_digest_check_detects_one_changed_element(synced):
    for r in synced:
        assert r["errors"]["digest"].startswith("rank(s) [1] hold another quantized model than rank 0")


def test_sync_model_refuses_ranks_of_another_layout(synced):
    for r in synced:
        assert r["errors"]["layout"] == ("torchrun rank 1 calibrated a quantized model of another layout than "
                                         "rank 0: tensor 'model.extra' is ['float32', [2]] there and absent on "
                                         "rank 0; run the same ptq4vit, timm and torch on every rank")
