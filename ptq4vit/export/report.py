"""What an ONNX export did, site by site: which products run in integers, which stay float and why."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError

__all__ = ["SiteExport", "FloatTransform", "ExportReport", "AllFloatError"]


class AllFloatError(UserError):
    """An int8 export in which no quantization site would run in integers (nothing was written).

    Its own class so that callers can name their own switch for it (the command line's
    ``--allow-float``, the library's ``allow_float=True``)."""

    def __init__(self, what: str, switch: str = "allow_float=True"):
        self.what = what
        super().__init__(f"{what}; pass {switch} to write it anyway")


@dataclass
class SiteExport:
    """How one quantization site was written to ONNX."""
    name: str
    kind: str          # linear | conv | matmul
    integer: bool      # its products run as integer matmuls
    lowering: str      # what the graph does, in words
    reason: str = ""   # why it stays float (fallbacks only)


@dataclass
class FloatTransform:
    """A module a quantization method added that runs in float in every export (no integer lowering):
    e.g. fc2's online input rotation (docs/lowbit.md §2)."""
    name: str
    what: str


@dataclass
class ExportReport:
    path: str
    int8: bool
    gemm: str
    twin_combine: str
    opset: int
    input_shape: tuple
    format: str = "contrib"
    sites: list = field(default_factory=list)
    float_transforms: list = field(default_factory=list)

    @property
    def fallbacks(self) -> list:
        """Sites that run in float, with the reason."""
        return [s for s in self.sites if not s.integer]

    def placement(self) -> dict:
        """``{site kind: (sites in integers, sites in float)}``, kinds in first-seen order."""
        out: dict = {}
        for s in self.sites:
            i, f = out.get(s.kind, (0, 0))
            out[s.kind] = (i + 1, f) if s.integer else (i, f + 1)
        return out

    def float_kinds(self) -> str:
        """The float sites counted by kind, e.g. ``"1 conv, 4 matmul"`` ("" when none)."""
        return ", ".join(f"{f} {kind}" for kind, (_, f) in self.placement().items() if f)

    def summary(self) -> str:
        n_int = sum(s.integer for s in self.sites)
        how = f", format={self.format}, gemm={self.gemm}, twin combine={self.twin_combine}"
        lines = [f"{self.path}: {'int8' if self.int8 else 'float32'} ONNX (opset {self.opset}, input {self.input_shape}"
                 + (how if self.int8 else "") + ")"]
        if self.int8:
            n_float = len(self.sites) - n_int
            lines.append(f"  {n_int}/{len(self.sites)} quantization sites run as integer matmuls"
                         + (f"; {n_float} stay{'s' if n_float == 1 else ''} float ({self.float_kinds()})" if n_float else ""))
            kinds: dict = {}
            for s in self.sites:
                if s.integer:
                    kinds[s.lowering] = kinds.get(s.lowering, 0) + 1
            for what, n in kinds.items():
                lines.append(f"    {n:3d} x {what}")
            groups: dict = {}
            for s in self.fallbacks:
                groups.setdefault((s.kind, s.reason), []).append(s.name)
            for (kind, reason), names in groups.items():
                if len(names) == 1:
                    lines.append(f"  float fallback: {names[0]} ({kind}): {reason}")
                else:
                    lines.append(f"  float fallback, {len(names)} {kind}s: {reason}: {', '.join(names)}")
            transforms: dict = {}
            for t in self.float_transforms:
                transforms.setdefault(t.what, []).append(t.name)
            for what, names in transforms.items():
                if len(names) == 1:
                    lines.append(f"  float transform: {names[0]}: {what} (no integer lowering)")
                else:
                    lines.append(f"  float transforms, {len(names)} x {what} (no integer lowering): {', '.join(names)}")
        return "\n".join(lines)
