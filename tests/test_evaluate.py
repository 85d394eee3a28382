"""Single-process evaluation: counts, predictions, skipped images."""
import shutil

import torch

from ptq4vit.harness import zoo
from ptq4vit.harness.data import ImageFolder
from ptq4vit.harness.evaluate import evaluate

TINY = dict(img_size=32, patch_size=8, depth=1, embed_dim=48, num_heads=2, num_classes=10)


def test_evaluate_matches_manual_loop(cifar_dir):
    lm = zoo.create("vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY, init_seed=2)
    ds = ImageFolder(cifar_dir / "test", lm.transform(), limit_per_class=3)
    r = evaluate(lm.model, ds, batch_size=7, progress=True, return_predictions=True)
    with torch.no_grad():
        preds = [int(lm.model(ds[i][0][None]).argmax()) for i in range(len(ds))]
    assert r.total == len(ds) == 30 and r.skipped == 0
    assert r.predictions == preds
    assert r.correct == sum(p == t for p, t in zip(preds, ds.targets))
    assert abs(r.top1 - 100.0 * r.correct / 30) < 1e-9


def test_evaluate_skips_unreadable(cifar_dir, tmp_path):
    root = tmp_path / "d"
    for cls in ("airplane", "cat"):
        (root / cls).mkdir(parents=True)
        for f in sorted((cifar_dir / "test" / cls).iterdir())[:2]:
            shutil.copy(f, root / cls / f.name)
    (root / "cat" / "zz_broken.jpg").write_bytes(b"garbage")
    lm = zoo.create("vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY)
    ds = ImageFolder(root, lm.transform())
    r = evaluate(lm.model, ds, batch_size=2, progress=False, return_predictions=True)
    assert (r.total, r.skipped) == (4, 1)
    assert r.skipped_paths[0].endswith("zz_broken.jpg")
    assert r.predictions[-1] == -1


def test_evaluate_returns_logits_in_dataset_order(cifar_dir, tmp_path):
    root = tmp_path / "d"
    for cls in ("airplane", "cat"):
        (root / cls).mkdir(parents=True)
        for f in sorted((cifar_dir / "test" / cls).iterdir())[:2]:
            shutil.copy(f, root / cls / f.name)
    (root / "airplane" / "zz_broken.jpg").write_bytes(b"garbage")
    lm = zoo.create("vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY, init_seed=1)
    ds = ImageFolder(root, lm.transform())
    r = evaluate(lm.model, ds, batch_size=2, progress=False, return_predictions=True, return_logits=True)
    assert r.logits.shape == (5, 10)
    assert torch.isnan(r.logits[2]).all() and not torch.isnan(r.logits[[0, 1, 3, 4]]).any()
    with torch.no_grad():
        for i in (0, 1, 3, 4):
            # batches of 2 vs 1 image: GEMM rounding differs, measured 3e-8 on logits of ~0.1
            assert (r.logits[i] - lm.model(ds[i][0][None])[0]).abs().max() <= 2e-7
            assert int(r.logits[i].argmax()) == r.predictions[i]
