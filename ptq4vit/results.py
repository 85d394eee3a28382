"""Results: an append-only JSONL file of finished runs, and reports drawn from it.

* :class:`ResultsFile` appends each run as one line with a single ``write`` + ``flush`` +
  ``fsync`` under a lock, so a killed sweep leaves at most a partial last line, which readers
  ignore and the next append cuts off. Every row carries a ``key`` (the hash of what defines
  the run); a resumed sweep skips keys already present, so nothing is lost or counted twice.
* :func:`write_report` renders the rows as Markdown, CSV and JSON tables laid out like the
  paper's (next to the paper's numbers, docs/method.md §7) and draws the accuracy-drop plot;
  :func:`plot_activations` draws the post-softmax / post-GELU distributions of one block with
  the chosen quantization grid.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Optional, Sequence

from .errors import UserError

# --------------------------------------------------------------------------- paper numbers (docs/method.md §7)

#: ImageNet top-1 (%) from the paper's README: model -> (FP, base W8A8, base W6A6, PTQ4ViT W8A8, PTQ4ViT W6A6).
_PAPER_ROWS = {
    "ViT-S/224/32": (75.99, 73.61, 60.144, 75.582, 71.908),
    "ViT-S/224": (81.39, 80.468, 70.244, 81.002, 78.63),
    "ViT-B/224": (84.54, 83.896, 75.668, 84.25, 81.65),
    "ViT-B/384": (86.00, 85.352, 46.886, 85.828, 83.348),
    "DeiT-S/224": (79.80, 77.654, 72.268, 79.474, 76.282),
    "DeiT-B/224": (81.80, 80.946, 78.786, 81.482, 80.25),
    "DeiT-B/384": (83.11, 82.33, 68.442, 82.974, 81.55),
    "Swin-T/224": (81.39, 80.962, 78.456, 81.246, 80.47),
    "Swin-S/224": (83.23, 82.758, 81.742, 83.106, 82.38),
    "Swin-B/224": (85.27, 84.792, 83.354, 85.146, 84.012),
    "Swin-B/384": (86.44, 86.168, 85.226, 86.394, 85.388),
}
#: Which paper column a preset is compared with.
PAPER_METHOD = {"base": "base", "base-cosine": "base", "official": "PTQ4ViT", "ptq4vit": "PTQ4ViT"}
PRESET_ORDER = ("base", "base-cosine", "official", "ptq4vit")


def paper_top1(model: str, method: Optional[str] = None, bits: Optional[str] = None) -> Optional[float]:
    """The paper's number: ``method=None`` gives the float top-1, else ``"base"``/``"PTQ4ViT"`` at ``"W8A8"``/``"W6A6"``."""
    row = _PAPER_ROWS.get(model)
    if row is None:
        return None
    if method is None:
        return row[0]
    col = {("base", "W8A8"): 1, ("base", "W6A6"): 2, ("PTQ4ViT", "W8A8"): 3, ("PTQ4ViT", "W6A6"): 4}.get((method, bits))
    return None if col is None else row[col]


# --------------------------------------------------------------------------- run keys


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def run_key(identity: dict) -> str:
    """A short stable hash of the fields that define a run (model, weights, preset, bits, data ...)."""
    return hashlib.sha256(canonical(identity).encode()).hexdigest()[:20]


# --------------------------------------------------------------------------- the JSONL file


class ResultsFile:
    """An append-only JSONL file of runs, safe against killed writers and concurrent appenders."""

    def __init__(self, path):
        self.path = Path(path)

    # ---- reading
    def _parse(self, data: bytes) -> tuple[list[dict], int]:
        """Rows, and the byte length of the well-formed prefix (a trailing partial line excluded)."""
        rows, good_end, pos = [], 0, 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            end = len(data) if nl < 0 else nl
            line = data[pos:end].strip()
            if line:
                try:
                    row = json.loads(line)
                except ValueError:
                    row = None
                if isinstance(row, dict):
                    rows.append(row)
                    good_end = end + 1 if nl >= 0 else end
                elif nl < 0:
                    break  # a partial last line from a killed writer: ignored
                else:
                    good_end = end + 1  # a corrupt line in the middle: skipped, kept in the file
            elif nl >= 0:
                good_end = end + 1
            if nl < 0:
                break
            pos = nl + 1
        return rows, good_end

    def rows(self) -> list[dict]:
        """All complete rows, in file order (a partial last line is ignored)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except IsADirectoryError:
            raise UserError(f"results file {self.path} is a folder") from None
        except OSError as e:
            raise UserError(f"cannot read results file {self.path}: {e.strerror or e}") from None
        return self._parse(data)[0]

    def keys(self) -> set:
        return {r.get("key") for r in self.rows() if r.get("key")}

    def find(self, key: str) -> Optional[dict]:
        found = None
        for r in self.rows():
            if r.get("key") == key:
                found = r
        return found

    # ---- writing
    @contextlib.contextmanager
    def _locked(self):
        import fcntl
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name("." + self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def append(self, row: dict, *, replace: bool = False) -> bool:
        """Append ``row`` (which must have a ``key``) as one line. An existing row with that key is kept
        and ``False`` returned, unless ``replace``, which rewrites the file (atomically) without it."""
        key = row.get("key")
        if not key:
            raise ValueError("a results row needs a 'key'")
        line = (json.dumps(row, sort_keys=False, default=str) + "\n").encode()
        try:
            with self._locked():
                try:
                    data = self.path.read_bytes()
                except FileNotFoundError:
                    data = b""
                rows, good_end = self._parse(data)
                if any(r.get("key") == key for r in rows):
                    if not replace:
                        return False
                    kept = b"".join((json.dumps(r, default=str) + "\n").encode() for r in rows if r.get("key") != key)
                    _atomic_write_bytes(self.path, kept + line)
                    return True
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    if good_end < len(data):
                        os.ftruncate(fd, good_end)  # cut off a partial last line left by a killed writer
                    prefix = b"\n" if good_end and not data[:good_end].endswith(b"\n") else b""
                    os.lseek(fd, 0, os.SEEK_END)
                    _write_all(fd, prefix + line)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                return True
        except OSError as e:
            raise UserError(f"cannot write results file {self.path}: {e.strerror or e}") from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def atomic_write_text(path, text: str) -> None:
    """Write a text file via a temporary file and rename, so readers never see half of it."""
    _atomic_write_bytes(Path(path), text.encode())


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".")
    try:
        _write_all(fd, data)
        os.fsync(fd)
        os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def ensure_writable_dir(path) -> Path:
    """Create ``path`` if needed and check that files can be written in it; UserError otherwise."""
    p = Path(path).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {p}: {e.strerror or e}") from None
    if not p.is_dir():
        raise UserError(f"output folder {p} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        raise UserError(f"output folder {p} is not writable: {e.strerror or e}") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"output folder {p} is not writable")
    return p


# --------------------------------------------------------------------------- tables


def latest_by_key(rows: Iterable[dict]) -> list[dict]:
    """One row per key (the last one), in first-seen order."""
    out: "OrderedDict[str, dict]" = OrderedDict()
    for r in rows:
        out[r.get("key") or id(r)] = r
    return list(out.values())


def load_rows(paths: Sequence) -> list[dict]:
    rows = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise UserError(f"results file {p} does not exist")
        rows.extend(ResultsFile(p).rows())
    return latest_by_key(rows)


def _bits(r: dict) -> str:
    return f"W{r['w_bits']}A{r['a_bits']}"


def _method_label(r: dict) -> str:
    ov = r.get("overrides") or {}
    if not ov:
        return r["preset"]
    return r["preset"] + "[" + ",".join(f"{k}={v}" for k, v in sorted(ov.items())) + "]"


def _bits_order(b: str) -> tuple:
    w, a = b[1:].split("A")
    return (-int(w), -int(a))


def _model_order(models: Iterable[str]) -> list[str]:
    from .zoo import MODELS
    order = {e.short: i for i, e in enumerate(MODELS)}
    return sorted(set(models), key=lambda m: (order.get(m, len(order)), m))


def _paper_comparable(r: dict) -> bool:
    """Paper numbers apply to real pretrained weights, the paper's presets without overrides."""
    return (r.get("weights") != "random-init" and not r.get("overrides") and r.get("preset") in PAPER_METHOD
            and r.get("model") in _PAPER_ROWS)


def _fmt(v, nd: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{nd}f}"


def _group_label(r: dict) -> tuple:
    """Rows in one table share evaluation data, limit and calibration draw."""
    return (r.get("eval_dir"), r.get("limit_per_class"), r.get("calib_size"), r.get("calib_seed"), r.get("calib_dir"))


def _groups(rows: list[dict]) -> "OrderedDict[tuple, list[dict]]":
    groups: "OrderedDict[tuple, list[dict]]" = OrderedDict()
    for r in rows:
        groups.setdefault(_group_label(r), []).append(r)
    return groups


def _caption(g: tuple, rows: list[dict]) -> str:
    eval_dir, limit, calib_size, seed, calib_dir = g
    n_eval = sorted({r.get("n_eval") for r in rows if r.get("n_eval") is not None})
    parts = [f"evaluated on `{eval_dir}`" + (f" (first {limit} images per class)" if limit else ""),
             f"{'/'.join(str(n) for n in n_eval)} images", f"calibration: {calib_size} images, seed {seed}, from `{calib_dir}`"]
    return "; ".join(parts)


def main_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    """The paper's main table: one line per model; FP, then each (method, bits) as ours and paper."""
    rows = [r for r in rows if r.get("ablation_row") is None]
    methods = sorted({_method_label(r) for r in rows},
                     key=lambda m: (PRESET_ORDER.index(m) if m in PRESET_ORDER else len(PRESET_ORDER), m))
    bits = sorted({_bits(r) for r in rows}, key=_bits_order)
    cols = [(m, b) for m in methods for b in bits if any(_method_label(r) == m and _bits(r) == b for r in rows)]
    header = ["model", "FP", "FP paper"]
    for m, b in cols:
        header += [f"{m} {b}", f"{m} {b} paper"]
    table = []
    for model in _model_order(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        fp = mrows[-1].get("float_top1")
        real = any(r.get("weights") != "random-init" for r in mrows)
        line = [model, fp, paper_top1(model) if real else None]
        for m, b in cols:
            cell = [r for r in mrows if _method_label(r) == m and _bits(r) == b]
            ours = cell[-1].get("quant_top1") if cell else None
            paper = paper_top1(model, PAPER_METHOD.get(m), b) if cell and _paper_comparable(cell[-1]) else None
            line += [ours, paper]
        table.append(line)
    return header, table


def ablation_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    """The ablation table: one line per ablation row, a column per model and bit setting."""
    from .presets import ABLATION_ROWS
    rows = [r for r in rows if r.get("ablation_row") is not None]
    cols = []
    for model in _model_order(r["model"] for r in rows):
        for b in sorted({_bits(r) for r in rows if r["model"] == model}, key=_bits_order):
            cols.append((model, b))
    header = ["row", "metric, twins", "preset"] + [f"{m} {b}" for m, b in cols]
    table = []
    for preset in sorted({r["preset"] for r in rows}):
        for num in sorted({int(r["ablation_row"]) for r in rows if r["preset"] == preset}):
            line = [num, ABLATION_ROWS.get(num, (f"row {num}",))[0], preset]
            for m, b in cols:
                cell = [r for r in rows if r["preset"] == preset and int(r["ablation_row"]) == num
                        and r["model"] == m and _bits(r) == b]
                line.append(cell[-1].get("quant_top1") if cell else None)
            table.append(line)
    return header, table


def _markdown(header: list[str], table: list[list], paired: bool) -> str:
    """Markdown; with ``paired`` each "X" / "X paper" column pair is shown as one ``ours (paper)`` cell."""
    if paired:
        hdr, idx = [], []
        i = 0
        while i < len(header):
            if i + 1 < len(header) and header[i + 1] == header[i] + " paper":
                hdr.append(header[i])
                idx.append((i, i + 1))
                i += 2
            else:
                hdr.append(header[i])
                idx.append((i, None))
                i += 1
    else:
        hdr, idx = header, [(i, None) for i in range(len(header))]
    numeric = [all(row[a] is None or isinstance(row[a], (int, float)) for row in table) for a, _ in idx]
    lines = ["| " + " | ".join(hdr) + " |", "|" + "|".join("---:" if num else "---" for num in numeric) + "|"]
    for row in table:
        cells = []
        for a, b in idx:
            v = row[a]
            s = _fmt(v) if isinstance(v, float) or v is None else str(v)
            if b is not None and row[b] is not None:
                s += f" ({_fmt(row[b])})"
            cells.append(s)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _csv_text(header: list[str], table: list[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in table:
        w.writerow(["" if v is None else (round(v, 4) if isinstance(v, float) else v) for v in row])
    return buf.getvalue()


LONG_FIELDS = ("model", "timm_name", "timm_tag", "weights", "preset", "overrides", "ablation_row", "w_bits", "a_bits",
               "calib_size", "calib_seed", "n_eval", "float_top1", "quant_top1", "drop", "paper_top1",
               "vs_paper", "calib_seconds", "device", "world_size", "torch", "timm", "ptq4vit", "key")


def long_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        paper = paper_top1(r["model"], PAPER_METHOD.get(r["preset"]), _bits(r)) if _paper_comparable(r) \
            and r.get("ablation_row") is None else None
        d = {k: r.get(k) for k in LONG_FIELDS}
        d["overrides"] = canonical(r.get("overrides") or {})
        d["paper_top1"] = paper
        d["vs_paper"] = None if paper is None or r.get("quant_top1") is None else r["quant_top1"] - paper
        out.append(d)
    return out


def render_markdown(rows: list[dict]) -> str:
    """All tables of a results set as one Markdown document."""
    rows = latest_by_key(rows)
    parts = ["# PTQ4ViT results", "",
             "Top-1 accuracy (%). A cell reads `ours (paper)`; the paper's numbers (docs/method.md §7, full ImageNet val, "
             "32 calibration images) are shown for its presets on real weights. `base` and `base-cosine` are "
             "compared with the paper's Base PTQ, `official` and `ptq4vit` with its PTQ4ViT column.", ""]
    for g, grows in _groups(rows).items():
        mrows = [r for r in grows if r.get("ablation_row") is None]
        arows = [r for r in grows if r.get("ablation_row") is not None]
        if mrows:
            parts += [f"## Main table", "", _caption(g, mrows), "", _markdown(*main_table(mrows), paired=True), ""]
        if arows:
            parts += [f"## Ablation", "", _caption(g, arows), "", _markdown(*ablation_table(arows), paired=False), ""]
    parts += ["## All runs", "", _markdown(*_runs_table(rows), paired=False), ""]
    return "\n".join(parts)


def _run_label(r: dict) -> str:
    if r.get("ablation_row") is None:
        return _method_label(r)
    from .presets import ABLATION_ROWS
    label, row_ov = ABLATION_ROWS.get(int(r["ablation_row"]), (f"row {r['ablation_row']}", {}))
    extra = {k: v for k, v in (r.get("overrides") or {}).items() if row_ov.get(k, object()) != v}
    return f"{r['preset']} ablation {r['ablation_row']}: {label}" + "".join(f", {k}={v}" for k, v in sorted(extra.items()))


def _runs_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    header = ["model", "method", "bits", "calib", "images", "float top-1", "quant top-1", "drop", "calib s", "device"]
    table = [[r["model"], _run_label(r),
              _bits(r), r.get("calib_size"), r.get("n_eval"), r.get("float_top1"), r.get("quant_top1"), r.get("drop"),
              r.get("calib_seconds"), r.get("device")] for r in rows]
    return header, table


def write_report(rows: list[dict], out_dir, *, plots: bool = True) -> dict:
    """Write ``report.md``, ``results.csv`` (one line per run), ``main_table.csv``, ``ablation_table.csv``,
    ``report.json`` and ``accuracy_drop.png`` into ``out_dir``; returns {name: path}."""
    out = ensure_writable_dir(out_dir)
    rows = latest_by_key(rows)
    if not rows:
        raise UserError("no results to report (the results file is empty)")
    written = {}
    atomic_write_text(out / "report.md", render_markdown(rows))
    written["markdown"] = out / "report.md"
    lrows = long_rows(rows)
    atomic_write_text(out / "results.csv", _csv_text(list(LONG_FIELDS), [[d[k] for k in LONG_FIELDS] for d in lrows]))
    written["csv"] = out / "results.csv"
    tables = {}
    mrows = [r for r in rows if r.get("ablation_row") is None]
    arows = [r for r in rows if r.get("ablation_row") is not None]
    if mrows:
        h, t = main_table(mrows)
        atomic_write_text(out / "main_table.csv", _csv_text(h, t))
        written["main_table"] = out / "main_table.csv"
        tables["main"] = [dict(zip(h, line)) for line in t]
    if arows:
        h, t = ablation_table(arows)
        atomic_write_text(out / "ablation_table.csv", _csv_text(h, t))
        written["ablation_table"] = out / "ablation_table.csv"
        tables["ablation"] = [dict(zip(h, line)) for line in t]
    atomic_write_text(out / "report.json", json.dumps({"tables": tables, "runs": lrows}, indent=1, default=str) + "\n")
    written["json"] = out / "report.json"
    if plots:
        written["accuracy_drop"] = plot_accuracy_drop(rows, out / "accuracy_drop.png")
    return written


# --------------------------------------------------------------------------- plots


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'ptq4vit[report]'") from None
    return plt


def _series_label(r: dict) -> str:
    if r.get("ablation_row") is not None:
        return f"{r['preset']} ablation row {r['ablation_row']}"
    return _method_label(r)


def plot_accuracy_drop(rows: list[dict], path) -> Path:
    """Grouped bars: float minus quantized top-1 per model, one bar per method and bit setting."""
    plt = _pyplot()
    rows = [r for r in latest_by_key(rows) if r.get("drop") is not None]
    models = _model_order(r["model"] for r in rows)
    series = sorted({(_series_label(r), _bits(r)) for r in rows}, key=lambda s: (_bits_order(s[1]), s[0]))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(models) * max(1, len(series)) ** 0.5 + 2), 4.5))
    width = 0.8 / max(1, len(series))
    for j, (m, b) in enumerate(series):
        xs, ys = [], []
        for i, model in enumerate(models):
            cell = [r for r in rows if r["model"] == model and _bits(r) == b and _series_label(r) == m]
            if cell:
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(cell[-1]["drop"])
        ax.bar(xs, ys, width=width, label=f"{m} {b}")
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels(models, rotation=30, ha="right")
    ax.set_ylabel("top-1 drop vs float (points)")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_title("Accuracy drop from quantization")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def softmax_grid(entry: dict, bits: int, head: int = 0) -> tuple[list[float], Optional[float]]:
    """Representable post-softmax values of a matmul2 A operand (twin: both ranges) and the split, if any."""
    qmax = 2 ** (bits - 1)
    if "split" in entry:
        s = float(entry["split"])
        d1, d2 = s / (qmax - 1), 1.0 / (qmax - 1)
        lo = [k * d1 for k in range(qmax) if k * d1 < s]
        hi = [k * d2 for k in range(qmax) if k * d2 >= s]
        return lo + hi, s
    d = float(entry["a_scale"][min(head, len(entry["a_scale"]) - 1)])
    return [k * d for k in range(qmax)], None


def gelu_grid(entry: dict, bits: int) -> list[float]:
    """Representable post-GELU values of fc2's input (twin: negative Δ- range and positive Δ+ range)."""
    qmax = 2 ** (bits - 1)
    pos = float(entry["a_scale"][0])
    if "a_neg_scale" in entry:
        neg = float(entry["a_neg_scale"])
        return [-k * neg for k in range(qmax, 0, -1)] + [k * pos for k in range(qmax)]
    return [k * pos for k in range(-qmax, qmax)]


def find_block(model, layer) -> str:
    """The module name of a transformer block (one with ``attn`` and ``mlp.fc2``): a name, or an index into
    the model's blocks (negative counts from the end)."""
    blocks = [n for n, m in model.named_modules() if hasattr(m, "attn") and hasattr(getattr(m, "mlp", None), "fc2")]
    if not blocks:
        raise UserError("the model has no transformer blocks with attn and mlp.fc2")
    if layer is None:
        return blocks[len(blocks) // 2]
    if isinstance(layer, int) or (isinstance(layer, str) and layer.lstrip("-").isdigit()):
        i = int(layer)
        if not -len(blocks) <= i < len(blocks):
            raise UserError(f"block index {i} out of range: the model has {len(blocks)} blocks")
        return blocks[i]
    name = str(layer)
    for suffix in (".attn.matmul2", ".mlp.fc2", ".attn", ".mlp"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name not in blocks:
        raise UserError(f"no block {layer!r}; blocks are {', '.join(blocks[:4])}{' ...' if len(blocks) > 4 else ''}")
    return name


def capture_block_activations(model, images, block: str, batch_size: int = 8) -> tuple:
    """Post-softmax attention probabilities ``(B, heads, N, N)`` and the post-GELU fc2 input of ``block``,
    from the float model (its attention is switched to the explicit, non-fused path while capturing)."""
    import torch
    mod = model.get_submodule(block)
    attn, fc2 = mod.attn, mod.mlp.fc2
    probs, gelu = [], []
    saved = getattr(attn, "fused_attn", None)
    if saved is not None:
        attn.fused_attn = False
    drop = getattr(attn, "attn_drop", None)
    if drop is None:
        raise UserError(f"cannot capture the softmax output of {block}.attn (no attn_drop module)")
    h1 = drop.register_forward_pre_hook(lambda m, a: probs.append(a[0].detach().cpu()))
    h2 = fc2.register_forward_pre_hook(lambda m, a: gelu.append(a[0].detach().cpu()))
    try:
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                model(images[i:i + batch_size])
    finally:
        h1.remove()
        h2.remove()
        if saved is not None:
            attn.fused_attn = saved
    return torch.cat([p.reshape(-1, *p.shape[-3:]) for p in probs]), torch.cat([g.reshape(-1) for g in gelu])


def plot_activations(model, images, qparams: dict, path, layer=None, *, title: str = "") -> Path:
    """Histograms of the post-softmax and post-GELU activations of one block with the quantization grid
    chosen in ``qparams`` (docs/method.md §8) drawn over them."""
    import numpy as np
    plt = _pyplot()
    block = find_block(model, layer)
    probs, gelu = capture_block_activations(model, images, block)
    a_bits = int(qparams["a_bits"])
    mods = qparams.get("modules", {})
    m2 = mods.get(f"{block}.attn.matmul2")
    f2 = mods.get(f"{block}.mlp.fc2")
    if m2 is None or f2 is None:
        raise UserError(f"the quantization parameters have no {block}.attn.matmul2 / {block}.mlp.fc2 entries")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))

    # post-softmax, log-x
    grid, split = softmax_grid(m2, a_bits)
    vals = (probs if split is not None else probs[:, 0]).reshape(-1).numpy()
    floor = 1e-7
    bins = np.logspace(np.log10(floor), 0, 120)
    ax1.hist(np.clip(vals, floor, 1.0), bins=bins, color="tab:blue", alpha=0.7, log=True)
    ax1.set_xscale("log")
    pos_grid = [g for g in grid if g > 0]
    ax1.vlines(pos_grid, 0, 0.08, transform=ax1.get_xaxis_transform(), color="tab:red", linewidth=0.8,
               label=f"grid ({len(grid)} levels incl. 0)")
    if split is not None:
        ax1.axvline(split, color="tab:red", linestyle="--", linewidth=1.2, label=f"twin split s = 2^{round(math.log2(split))}")
    ax1.set_xlabel("post-softmax value (log scale; values below 1e-7 piled at the left)")
    ax1.set_ylabel("count")
    ax1.set_title(f"{block}.attn.matmul2 A ({'twin' if split is not None else 'uniform, head 0'}, {a_bits} bits)")
    ax1.legend(fontsize="small")

    # post-GELU, linear-x
    ggrid = gelu_grid(f2, a_bits)
    g = gelu.numpy()
    ax2.hist(g, bins=200, color="tab:green", alpha=0.7, log=True)
    ax2.vlines(ggrid, 0, 0.08, transform=ax2.get_xaxis_transform(), color="tab:red", linewidth=0.6,
               label=f"grid ({len(ggrid)} levels)")
    ax2.axvline(ggrid[0], color="tab:red", linestyle=":", linewidth=1)
    ax2.axvline(ggrid[-1], color="tab:red", linestyle=":", linewidth=1, label="clipping range")
    ax2.set_xlabel("post-GELU value (fc2 input)")
    ax2.set_title(f"{block}.mlp.fc2 input ({'twin' if 'a_neg_scale' in f2 else 'uniform'}, {a_bits} bits)")
    ax2.legend(fontsize="small")
    fig.suptitle(title or f"{qparams.get('model', '')} {qparams.get('preset', '')} W{qparams.get('w_bits')}A{a_bits}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
