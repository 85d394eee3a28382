"""Image folders, RGB conversion, unreadable images, calibration draws, data-root errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from ptq4vit.harness.data import (ImageFolder, calibration_and_pool, calibration_images, calibration_permutation, collate,
                                  load_rgb, make_loader, resolve_splits)
from ptq4vit.recipes.named import get_recipe
from ptq4vit.errors import UserError

from conftest import missing_shared


def _tensor(img):
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255.0


def _write_tree(root, spec):
    """spec: {class: [(name, mode or 'corrupt')]}"""
    for cls, files in spec.items():
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        for name, mode in files:
            p = d / name
            if mode == "corrupt":
                p.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
            elif mode == "truncated":
                Image.new("RGB", (40, 40), (10, 200, 30)).save(p, "JPEG")
                p.write_bytes(p.read_bytes()[:60])
            else:
                fmt = "PNG" if name.endswith(".png") else "JPEG"
                color = {"RGB": (200, 30, 10), "L": 128, "CMYK": (0, 255, 255, 0), "P": 3, "RGBA": (1, 2, 3, 4)}[mode]
                img = Image.new(mode, (40, 30), color)
                if mode == "P":
                    img.info["transparency"] = 0
                img.save(p, fmt)
    return root


def test_order_matches_torchvision(cifar_dir):
    from torchvision.datasets import ImageFolder as TVImageFolder
    ours = ImageFolder(cifar_dir / "calib")
    tv = TVImageFolder(str(cifar_dir / "calib"))
    assert ours.classes == tv.classes
    assert ours.samples == [(p, t) for p, t in tv.samples]


def test_calibration_permutation_is_the_papers_draw():
    np.random.seed(3)
    expected = np.random.permutation(1000)[:32]
    state = np.random.get_state()
    assert (calibration_permutation(1000, 3)[:32] == expected).all()
    # numpy's global state is untouched
    assert all((a == b).all() if isinstance(a, np.ndarray) else a == b for a, b in zip(state, np.random.get_state()))


def test_calibration_images_draw_the_permutation(cifar_dir):
    tf = lambda im: _tensor(im)  # noqa: E731
    ds = ImageFolder(cifar_dir / "calib", tf)
    cal = calibration_images(ds, 32, 3)
    np.random.seed(3)
    idx = np.random.permutation(len(ds))[:32]
    assert cal.indices == [int(i) for i in idx]
    assert cal.images.shape == (32, 3, 32, 32)
    assert torch.equal(cal.images[0], ds[int(idx[0])][0])


@pytest.mark.parametrize("pool_images, drawn", [(40, 40), (20, 32)])
def test_the_reconstruction_pool_is_the_calibration_draw_continued(cifar_dir, pool_images, drawn):
    ds = ImageFolder(cifar_dir / "calib", _tensor)
    draw = calibration_images(ds, drawn, 3).images
    calib, pool = calibration_and_pool(ds, get_recipe("rotq", reconstruction="learned",
                                                      **{"reconstruction.images": pool_images}), 32, seed=3)
    assert torch.equal(calib, draw[:32]) and torch.equal(pool, draw)  # a pool below 32 still holds every calibration image
    calib, pool = calibration_and_pool(ds, get_recipe("rotq"), 32, seed=3)
    assert torch.equal(calib, draw[:32]) and pool is None


def test_modes_are_converted_to_rgb(tmp_path):
    root = _write_tree(tmp_path / "d", {"a": [("gray.jpg", "L"), ("cmyk.jpg", "CMYK")],
                                         "b": [("pal.png", "P"), ("alpha.png", "RGBA"), ("rgb.JPEG", "RGB")]})
    ds = ImageFolder(root, _tensor)
    assert len(ds) == 5
    for i in range(len(ds)):
        img, label, idx = ds[i]
        assert img.shape == (3, 30, 40) and idx == i
    assert [t for _, t in ds.samples] == [0, 0, 1, 1, 1]
    assert load_rgb(ds.samples[1][0]).mode == "RGB"  # CMYK JPEG


def test_real_grayscale_imagenet_image(imagenet_sample_dir):
    p = imagenet_sample_dir / "val" / "n02096051" / "n02096051_Airedale.JPEG"
    if not p.exists():
        missing_shared(str(p))
    assert Image.open(p).mode == "L"
    assert load_rgb(str(p)).mode == "RGB"


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    root = _write_tree(tmp_path / "d", {"a": [("1.jpg", "RGB"), ("2.jpg", "corrupt"), ("3.jpg", "RGB")],
                                         "b": [("4.jpg", "truncated"), ("5.jpg", "RGB")]})
    ds = ImageFolder(root, _tensor)
    batches = list(make_loader(ds, batch_size=2))
    good = sum(len(b) for b in batches)
    skipped = [i for b in batches for i in b.skipped]
    assert good == 3 and sorted(skipped) == [1, 3]
    # calibration passes over unreadable images and keeps the batch full
    cal = calibration_images(ds, 3, seed=0)
    # seed 0 draws [2, 0, 1, 3, 4]: images 1 and 3 are unreadable, so image 4 completes the batch
    assert [int(i) for i in calibration_permutation(5, 0)] == [2, 0, 1, 3, 4]
    assert len(cal.images) == 3 and cal.indices == [2, 0, 4]
    assert cal.skipped == [ds.samples[1][0], ds.samples[3][0]]
    assert all("2.jpg" not in p and "4.jpg" not in p for p in cal.paths)


def test_strict_mode_names_the_file(tmp_path):
    root = _write_tree(tmp_path / "d", {"a": [("1.jpg", "RGB"), ("bad.jpg", "corrupt")]})
    ds = ImageFolder(root, _tensor, strict=True)
    with pytest.raises(UserError, match=r"bad\.jpg"):
        ds[1]


def test_collate_all_bad():
    b = collate([(None, 0, 5), (None, 1, 6)])
    assert b.images is None and len(b) == 0 and b.skipped == [5, 6]


def test_limit_per_class_is_first_files(cifar_dir):
    ds = ImageFolder(cifar_dir / "test", limit_per_class=2)
    assert len(ds) == 20
    full = ImageFolder(cifar_dir / "test")
    assert ds.samples[:2] == full.samples[:2]


def test_folder_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ImageFolder(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.jpg").write_bytes(b"")
    with pytest.raises(UserError, match="no class folders"):
        ImageFolder(tmp_path / "flat")
    root = _write_tree(tmp_path / "d", {"a": [("1.jpg", "RGB")]})
    (root / "empty").mkdir()
    with pytest.raises(UserError, match=r"class folder .*empty has no images"):
        ImageFolder(root)


def test_resolve_splits(tmp_path):
    with pytest.raises(UserError, match="data root .* does not exist"):
        resolve_splits(tmp_path / "missing")
    (tmp_path / "r" / "train").mkdir(parents=True)
    with pytest.raises(UserError, match=r"has no val/ folder"):
        resolve_splits(tmp_path / "r")
    (tmp_path / "s" / "val").mkdir(parents=True)
    with pytest.raises(UserError, match=r"has no train/ folder .*--calib-dir"):
        resolve_splits(tmp_path / "s")
    sp = resolve_splits(tmp_path / "s", calib_dir=tmp_path / "s" / "val")
    assert sp.val_dir == sp.calib_dir == tmp_path / "s" / "val"
    sp = resolve_splits(tmp_path / "s", need_calib=False)
    assert sp.calib_dir is None
