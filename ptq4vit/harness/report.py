"""Reports drawn from the results store: Markdown, CSV and JSON tables laid out like the paper's
(next to the paper's numbers, docs/method.md §7), and the accuracy-drop plot."""
from __future__ import annotations

import csv
import io
import json
import math
from collections import OrderedDict

from ..atomic_write import atomic_write_text
from ..errors import UserError
from .labels import bits_label, bits_order, method_label, model_order
from .paper import PAPER_METHOD, PAPER_ROWS, PRESET_ORDER, paper_top1
from .plots import plot_accuracy_drop
from .store import canonical, ensure_writable_dir, latest_by_key


def _paper_comparable(r: dict) -> bool:
    """Paper numbers apply to real pretrained weights, the paper's presets without overrides."""
    return (r.get("weights") != "random-init" and not r.get("overrides") and r.get("preset") in PAPER_METHOD
            and r.get("model") in PAPER_ROWS)


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
    methods = sorted({method_label(r) for r in rows},
                     key=lambda m: (PRESET_ORDER.index(m) if m in PRESET_ORDER else len(PRESET_ORDER), m))
    bits = sorted({bits_label(r) for r in rows}, key=bits_order)
    cols = [(m, b) for m in methods for b in bits if any(method_label(r) == m and bits_label(r) == b for r in rows)]
    header = ["model", "FP", "FP paper"]
    for m, b in cols:
        header += [f"{m} {b}", f"{m} {b} paper"]
    table = []
    for model in model_order(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        fp = mrows[-1].get("float_top1")
        real = any(r.get("weights") != "random-init" for r in mrows)
        line = [model, fp, paper_top1(model) if real else None]
        for m, b in cols:
            cell = [r for r in mrows if method_label(r) == m and bits_label(r) == b]
            ours = cell[-1].get("quant_top1") if cell else None
            paper = paper_top1(model, PAPER_METHOD.get(m), b) if cell and _paper_comparable(cell[-1]) else None
            line += [ours, paper]
        table.append(line)
    return header, table


def ablation_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    """The ablation table: one line per ablation row, a column per model and bit setting."""
    from .ablations import ABLATION_ROWS
    rows = [r for r in rows if r.get("ablation_row") is not None]
    cols = []
    for model in model_order(r["model"] for r in rows):
        for b in sorted({bits_label(r) for r in rows if r["model"] == model}, key=bits_order):
            cols.append((model, b))
    header = ["row", "metric, twins", "preset"] + [f"{m} {b}" for m, b in cols]
    table = []
    for preset in sorted({r["preset"] for r in rows}):
        for num in sorted({int(r["ablation_row"]) for r in rows if r["preset"] == preset}):
            line = [num, ABLATION_ROWS.get(num, (f"row {num}",))[0], preset]
            for m, b in cols:
                cell = [r for r in rows if r["preset"] == preset and int(r["ablation_row"]) == num
                        and r["model"] == m and bits_label(r) == b]
                line.append(cell[-1].get("quant_top1") if cell else None)
            table.append(line)
    return header, table


def variant_name(preset: str, overrides: dict) -> str:
    """The name ``ablations.VARIANT_ROWS`` gives ``overrides`` of ``preset``, else ``field=value, ...``."""
    from .ablations import VARIANT_ROWS
    for name, row in VARIANT_ROWS.get(preset, {}).items():
        if row == overrides:
            return name
    return ", ".join(f"{k}={v}" for k, v in sorted(overrides.items()))


def variants_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    """Each run of a preset with overrides beside the same preset as it is (same model and bits):
    one line per run, the preset's own first, with the agreement it gains or loses against it."""
    rows = [r for r in rows if r.get("ablation_row") is None]
    as_is = {(r["model"], r["preset"], bits_label(r)): r for r in rows if not r.get("overrides")}
    varied: "OrderedDict[tuple, list[dict]]" = OrderedDict()
    for r in rows:
        cell = (r["model"], r["preset"], bits_label(r))
        if r.get("overrides") and cell in as_is:
            varied.setdefault(cell, []).append(r)
    models = model_order(model for model, _, _ in varied)
    header = ["model", "preset", "variant", "bits", "top-1", "agreement %", "KL(float‖quant)", "agreement vs preset"]
    table = []
    for cell in sorted(varied, key=lambda c: (models.index(c[0]), c[1], bits_order(c[2]))):
        model, preset, b = cell
        base = as_is[cell]
        for r in [base] + varied[cell]:
            gain = (None if r is base or r.get("agreement") is None or base.get("agreement") is None
                    else r["agreement"] - base["agreement"])
            table.append([model, preset, "(as is)" if r is base else variant_name(preset, r["overrides"]), b,
                          r.get("quant_top1"), r.get("agreement"),
                          None if r.get("kl") is None else f"{r['kl']:.4f}", gain])
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
               "calib_size", "calib_seed", "n_eval", "float_top1", "quant_top1", "drop", "agreement", "kl", "paper_top1",
               "vs_paper", "calib_seconds", "device", "world_size", "torch", "timm", "ptq4vit", "key")


def long_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        paper = paper_top1(r["model"], PAPER_METHOD.get(r["preset"]), bits_label(r)) if _paper_comparable(r) \
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
            parts += ["## Main table", "", _caption(g, mrows), "", _markdown(*main_table(mrows), paired=True), ""]
        if arows:
            parts += ["## Ablation", "", _caption(g, arows), "", _markdown(*ablation_table(arows), paired=False), ""]
        vheader, vtable = variants_table(grows)
        if vtable:
            parts += ["## Variants", "", _caption(g, grows), "", _markdown(vheader, vtable, paired=False), ""]
    parts += ["## All runs", "", _markdown(*_runs_table(rows), paired=False), ""]
    return "\n".join(parts)


def _run_label(r: dict) -> str:
    if r.get("ablation_row") is None:
        return method_label(r)
    from .ablations import ABLATION_ROWS
    label, row_ov = ABLATION_ROWS.get(int(r["ablation_row"]), (f"row {r['ablation_row']}", {}))
    extra = {k: v for k, v in (r.get("overrides") or {}).items() if row_ov.get(k, object()) != v}
    return f"{r['preset']} ablation {r['ablation_row']}: {label}" + "".join(f", {k}={v}" for k, v in sorted(extra.items()))


def _runs_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    header = ["model", "method", "bits", "calib", "images", "float top-1", "quant top-1", "drop", "agreement %",
              "KL(float‖quant)", "calib s", "device"]
    table = [[r["model"], _run_label(r),
              bits_label(r), r.get("calib_size"), r.get("n_eval"), r.get("float_top1"), r.get("quant_top1"), r.get("drop"),
              r.get("agreement"), None if r.get("kl") is None else f"{r['kl']:.4f}", r.get("calib_seconds"),
              r.get("device")] for r in rows]
    return header, table


def write_report(rows: list[dict], out_dir, *, plots: bool = True) -> dict:
    """Write ``report.md``, ``results.csv`` (one line per run), ``main_table.csv``, ``ablation_table.csv``,
    ``variants_table.csv``, ``report.json`` and ``accuracy_drop.png`` into ``out_dir``; returns {name: path}."""
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
    h, t = variants_table(rows)
    if t:
        atomic_write_text(out / "variants_table.csv", _csv_text(h, t))
        written["variants_table"] = out / "variants_table.csv"
        tables["variants"] = [dict(zip(h, line)) for line in t]
    atomic_write_text(out / "report.json", json.dumps({"tables": tables, "runs": lrows}, indent=1, default=str) + "\n")
    written["json"] = out / "report.json"
    if plots:
        written["accuracy_drop"] = plot_accuracy_drop(rows, out / "accuracy_drop.png")
    return written


