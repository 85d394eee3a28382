"""Image folders, the evaluation transform, and calibration draws (docs/method.md §6).

* :class:`ImageFolder` reads an ImageFolder-style tree (``root/<class>/<image>``; ImageNet's
  ``val/<wnid>/``, CIFAR-10's ``test/<class>/`` ...). Classes are the sorted sub-folder names
  and files are listed in the same order as ``torchvision.datasets.ImageFolder``, so a
  calibration draw picks the very images the paper's scripts pick.
* Every image is converted to RGB (grayscale, CMYK, palette ...). An unreadable image is
  reported by path: skipped and counted, or, with ``strict=True``, a :class:`UserError`.
* :func:`calibration_images` draws ``numpy.random.seed(seed); permutation(len(ds))[:n]``.
* :func:`resolve_splits` turns a data root (``train/`` and ``val/``) plus options into the
  evaluation and calibration folders, with one-line errors for anything missing.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from ..recipes.recipe import Recipe

#: File endings read as images (compared case-insensitively), as torchvision's ImageFolder.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def load_rgb(path: str) -> Image.Image:
    """Open an image file as 8-bit RGB (grayscale, CMYK, palette and alpha images are converted)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


class ImageFolder(torch.utils.data.Dataset):
    """An ImageFolder-style dataset: ``root/<class>/.../<image>``, class index = sorted folder order.

    ``limit_per_class`` keeps the first N files of each class (in sorted order), a deterministic
    subset. ``__getitem__`` returns ``(image, label, index)``; when the image cannot be read it
    returns ``(None, label, index)`` (the loader's collate drops and counts it) unless ``strict``,
    in which case it raises :class:`UserError` naming the file.
    """

    def __init__(self, root, transform: Optional[Callable] = None, *, strict: bool = False,
                 limit_per_class: Optional[int] = None, what: str = "image folder"):
        root = Path(root).expanduser()
        if not root.exists():
            raise UserError(f"{what} {root} does not exist")
        if not root.is_dir():
            raise UserError(f"{what} {root} is not a folder")
        if limit_per_class is not None and limit_per_class < 1:
            raise UserError(f"the per-class limit must be at least 1, got {limit_per_class}")
        try:
            classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        except OSError as e:
            raise UserError(f"cannot list {what} {root}: {e.strerror or e}") from None
        if not classes:
            raise UserError(f"{what} {root} has no class folders (expected {root}/<class>/<image files>)")
        self.root = root
        self.classes: list[str] = classes
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.transform = transform
        self.strict = strict
        self.samples: list[tuple[str, int]] = []
        for idx, cls in enumerate(classes):
            files = _list_images(root / cls)
            if not files:
                raise UserError(f"class folder {root / cls} has no images "
                                f"(looked for {', '.join(IMG_EXTENSIONS)})")
            if limit_per_class is not None:
                files = files[:limit_per_class]
            self.samples.extend((p, idx) for p in files)

    def with_transform(self, transform: Optional[Callable]) -> "ImageFolder":
        """The same file list with another transform (no re-scan of the folder)."""
        other = copy.copy(self)
        other.transform = transform
        return other

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            img = load_rgb(path)
            if self.transform is not None:
                img = self.transform(img)
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
            if self.strict:
                raise UserError(f"cannot read image {path}: {_describe(e)}") from None
            return None, target, index
        return img, target, index

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.root)!r}, {len(self.classes)} classes, {len(self)} images)"


def _describe(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__


def _list_images(folder: Path) -> list[str]:
    out = []
    for dirpath, _, fnames in sorted(os.walk(folder, followlinks=True)):
        for fname in sorted(fnames):
            if fname.lower().endswith(IMG_EXTENSIONS):
                out.append(os.path.join(dirpath, fname))
    return out


@dataclass
class Batch:
    images: Optional[torch.Tensor]
    labels: torch.Tensor
    indices: torch.Tensor
    skipped: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.numel())


def collate(items: Sequence) -> Batch:
    """Stack readable images; unreadable ones (``None``) are left out and their indices reported."""
    good = [it for it in items if it[0] is not None]
    skipped = [int(it[2]) for it in items if it[0] is None]
    images = torch.stack([it[0] for it in good]) if good else None
    labels = torch.tensor([int(it[1]) for it in good], dtype=torch.long)
    indices = torch.tensor([int(it[2]) for it in good], dtype=torch.long)
    return Batch(images, labels, indices, skipped)


def make_loader(dataset, batch_size: int = 64, num_workers: int = 0, indices: Optional[Sequence[int]] = None,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A sequential loader over ``dataset`` (or the given subset of its indices) yielding :class:`Batch`."""
    ds = dataset if indices is None else torch.utils.data.Subset(dataset, list(indices))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                       collate_fn=collate, pin_memory=pin_memory,
                                       persistent_workers=False)


# --------------------------------------------------------------------------- calibration


def calibration_permutation(n: int, seed: int = 3) -> np.ndarray:
    """``numpy.random.seed(seed); numpy.random.permutation(n)`` without touching numpy's global state."""
    return np.random.RandomState(seed).permutation(n)


@dataclass
class Calibration:
    images: torch.Tensor            # (N, 3, H, W), transformed
    indices: list[int]              # dataset indices used, in draw order
    paths: list[str]
    skipped: list[str]              # unreadable files passed over


def calibration_images(dataset: ImageFolder, size: int = 32, seed: int = 3, *, progress: bool = False) -> Calibration:
    """The docs/method.md §6 draw: ``seed(seed); permutation(len(dataset))[:size]``, loaded as one batch.

    An unreadable image is skipped (or raises in a strict dataset) and the next one in the
    permutation takes its place, so the batch always holds ``size`` images.
    """
    if size < 1:
        raise UserError(f"calibration size must be at least 1, got {size}")
    if size > len(dataset):
        raise UserError(f"calibration size {size} is larger than the {len(dataset)} images in {dataset.root}")
    perm = calibration_permutation(len(dataset), seed)
    images, used, skipped = [], [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=size, desc="load calibration images", unit="img", leave=False)
    for idx in perm:
        if len(images) == size:
            break
        img, _, _ = dataset[int(idx)]
        if img is None:
            skipped.append(dataset.samples[int(idx)][0])
            continue
        images.append(img)
        used.append(int(idx))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if len(images) < size:
        raise UserError(f"only {len(images)} of the images in {dataset.root} are readable, "
                        f"{size} needed for calibration")
    return Calibration(torch.stack(images), used, [dataset.samples[i][0] for i in used], skipped)


def reconstruction_draw_size(recipe: Recipe, calib_size: int) -> int:
    """The size of the reconstruction pool a run draws (0 without reconstruction): the calibration draw
    continued to ``reconstruction.images``, and never fewer than the calibration images it starts with."""
    if recipe.reconstruction.variant == "none":
        return 0
    return max(calib_size, recipe.reconstruction.images)


def calibration_and_pool(dataset: ImageFolder, recipe: Recipe, calib_size: int = 32,
                         seed: int = 3) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(calibration images, reconstruction pool or None)`` for ``recipe`` from one draw of ``dataset``:
    the first ``calib_size`` images calibrate, and the pool is the draw continued
    (:func:`reconstruction_draw_size`), as a sweep draws them."""
    pool_size = reconstruction_draw_size(recipe, calib_size)
    draw = calibration_images(dataset, pool_size or calib_size, seed).images
    return draw[:calib_size], (draw if pool_size else None)


# --------------------------------------------------------------------------- data roots


@dataclass
class Splits:
    val_dir: Optional[Path]
    calib_dir: Optional[Path]


def resolve_splits(root=None, *, val_split: str = "val", calib_split: str = "train", calib_dir=None,
                   val_dir=None, need_val: bool = True, need_calib: bool = True) -> Splits:
    """Find the evaluation and calibration folders under an ImageNet-style root.

    ``root/val_split`` is evaluated and calibration images come from ``calib_dir`` if given,
    else ``root/calib_split``. Explicit ``val_dir`` replaces ``root/val_split``.
    """
    rootp = Path(root).expanduser() if root is not None else None
    if rootp is not None:
        if not rootp.exists():
            raise UserError(f"data root {rootp} does not exist")
        if not rootp.is_dir():
            raise UserError(f"data root {rootp} is not a folder")
    v = None
    if need_val:
        if val_dir is not None:
            v = Path(val_dir).expanduser()
            if not v.is_dir():
                raise UserError(f"evaluation folder {v} does not exist")
        elif rootp is None:
            raise UserError("no data given: pass --data ROOT (a folder with val/ and train/)")
        else:
            v = rootp / val_split
            if not v.is_dir():
                raise UserError(f"data root {rootp} has no {val_split}/ folder "
                                f"(expected {v}/<class>/<images>; --val-split names another split)")
    c = None
    if need_calib:
        if calib_dir is not None:
            c = Path(calib_dir).expanduser()
            if not c.is_dir():
                raise UserError(f"calibration folder {c} does not exist")
        elif rootp is None:
            raise UserError("no calibration images: pass --data ROOT (with train/) or --calib-dir DIR")
        else:
            c = rootp / calib_split
            if not c.is_dir():
                raise UserError(f"data root {rootp} has no {calib_split}/ folder to draw calibration images "
                                f"from; pass --calib-dir DIR (or --calib-split)")
    return Splits(v, c)


def eval_transform(data_config: dict):
    """timm's evaluation transform for a resolved data config (resize, centre crop, normalize)."""
    from timm.data import create_transform
    return create_transform(**data_config, is_training=False)
