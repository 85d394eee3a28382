"""``ptq4vit report``: tables and plots from results files."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Optional

from ...errors import UserError
from ..labels import slug
from .common import Command


def _report_args(p):
    p.add_argument("results", nargs="*", default=["runs/results.jsonl"],
                   help="results JSONL files (default: %(default)s)")
    p.add_argument("--out", default=None, help="report folder (default: <folder of the first results file>/report)")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    g = p.add_argument_group("activation plot")
    g.add_argument("--activations", action="store_true",
                   help="also plot one block's post-softmax and post-GELU activations with the chosen grid "
                        "(re-creates the run's float model and calibration images)")
    g.add_argument("--run", default=None,
                   help="which run: a key (or its prefix) or an index into the results (default: the last run)")
    g.add_argument("--layer", default=None, help="block name (blocks.5) or index (default: the middle block)")
    g.add_argument("--act-images", type=int, default=8, help="calibration images to run through (default: %(default)s)")
    g.add_argument("--weights", default=None, help="weights file/folder, when the run's path is not valid here")
    g.add_argument("--calib-dir", default=None, help="calibration folder, when the run's path is not valid here")


def _pick_run(rows: list[dict], which: Optional[str]) -> dict:
    if which is None:
        return rows[-1]
    if re.fullmatch(r"-?\d+", which) and len(which) < 6:
        i = int(which)
        if not -len(rows) <= i < len(rows):
            raise UserError(f"run index {i} out of range: {len(rows)} runs")
        return rows[i]
    hits = [r for r in rows if str(r.get("key", "")).startswith(which)]
    if len(hits) != 1:
        raise UserError(f"run {which!r} matches {len(hits)} runs; give a longer key or an index")
    return hits[0]


class ActivationPlot:
    """Everything one run's activation plot needs, gathered and checked before any file is written."""

    def __init__(self, row: dict, layer=None, n_images: int = 8, weights=None, calib_dir=None):
        from .. import zoo
        from ..data import ImageFolder, calibration_images
        from ..plots import _pyplot, activation_entries, find_block
        from .common import input_file, input_folder
        _pyplot()  # matplotlib is there
        if n_images < 1:
            raise UserError(f"--act-images must be at least 1, got {n_images}")
        self.row = row
        label = f"run {row.get('key', '?')} ({row['model']} {row['preset']} W{row['w_bits']}A{row['a_bits']})"
        qpath = row.get("qparams")
        if not qpath:
            raise UserError(f"{label} has no quantization parameters file recorded")
        try:
            self.qparams = json.loads(input_file(qpath, f"the quantization parameters of {label}").read_text())
        except ValueError:
            raise UserError(f"the quantization parameters {qpath} of {label} are not valid JSON") from None
        w = weights or row.get("weights")
        if w not in (None, "hub", "random-init") and not Path(w).exists():
            raise UserError(f"the weights {w} of {label} do not exist here: pass --weights")
        cdir = calib_dir or row.get("calib_dir")
        if not cdir or cdir == "None":
            raise UserError(f"{label} records no calibration folder: pass --calib-dir")
        input_folder(cdir, f"calibration folder of {label} (--calib-dir)")
        self.lm = zoo.create(row["model"], weights=None if w in ("hub", "random-init") else w, pretrained=w == "hub",
                             model_kwargs=row.get("model_kwargs") or {}, init_seed=row.get("init_seed") or 0)
        self.block = find_block(self.lm.model, layer)
        activation_entries(self.qparams, self.block, label)
        ds = ImageFolder(cdir, self.lm.transform(), what="calibration folder")
        n = max(1, min(n_images, int(row.get("calib_size") or n_images)))
        self.images = calibration_images(ds, n, int(row.get("calib_seed", 3))).images

    @property
    def file_name(self) -> str:
        r = self.row
        return f"activations_{slug(r['model'])}_{r['preset']}_W{r['w_bits']}A{r['a_bits']}.png"

    def draw(self, path) -> Path:
        from ..plots import plot_activations
        r = self.row
        return plot_activations(self.lm.model, self.images, self.qparams, path, self.block,
                                title=f"{r['model']} {r['preset']} W{r['w_bits']}A{r['a_bits']}")


def plot_run_activations(row: dict, path, layer=None, n_images: int = 8, weights=None, calib_dir=None) -> Path:
    """Re-create a run's float model and calibration images and draw its activation plot."""
    return ActivationPlot(row, layer, n_images, weights, calib_dir).draw(path)


def cmd_report(args) -> int:
    from ..report import write_report
    from ..store import load_rows
    from .common import input_file, output_folder
    for f in args.results:
        input_file(f, "results file")
    rows = load_rows(args.results)
    if not rows:
        raise UserError(f"no results to report: {', '.join(args.results)} holds no runs")
    out = Path(args.out) if args.out else Path(args.results[0]).parent / "report"
    output_folder(out, "report folder")
    if not args.no_plots:
        from ..plots import _pyplot
        _pyplot()
    plot = ActivationPlot(_pick_run(rows, args.run), args.layer, args.act_images, weights=args.weights,
                          calib_dir=args.calib_dir) if args.activations else None
    written = write_report(rows, out, plots=not args.no_plots)
    if plot is not None:
        written["activations"] = plot.draw(out / plot.file_name)
    print((out / "report.md").read_text())
    for k, v in written.items():
        print(f"{k}: {v}", file=sys.stderr)
    return 0


COMMANDS = (
    Command("report", "Markdown/CSV/JSON tables beside the paper's numbers, and plots",
            cmd_report, _report_args),
)
