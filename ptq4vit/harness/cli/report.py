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


def plot_run_activations(row: dict, path, layer=None, n_images: int = 8, weights=None, calib_dir=None) -> Path:
    """Re-create a run's float model and calibration images and draw its activation plot."""
    from .. import zoo
    from ..data import ImageFolder, calibration_images
    from ..plots import plot_activations
    w = weights or row.get("weights")
    qpath = row.get("qparams")
    if not qpath or not Path(qpath).is_file():
        raise UserError(f"the run's quantization parameters {qpath} are missing")
    qparams = json.loads(Path(qpath).read_text())
    lm = zoo.create(row["model"], weights=None if w in ("hub", "random-init") else w, pretrained=w == "hub",
                    model_kwargs=row.get("model_kwargs") or {}, init_seed=row.get("init_seed") or 0)
    ds = ImageFolder(calib_dir or row["calib_dir"], lm.transform(), what="calibration folder")
    n = max(1, min(n_images, int(row.get("calib_size") or n_images)))
    cal = calibration_images(ds, n, int(row.get("calib_seed", 3)))
    return plot_activations(lm.model, cal.images, qparams, path, layer,
                            title=f"{row['model']} {row['preset']} W{row['w_bits']}A{row['a_bits']}")


def cmd_report(args) -> int:
    from ..report import write_report
    from ..store import load_rows
    rows = load_rows(args.results)
    out = Path(args.out) if args.out else Path(args.results[0]).parent / "report"
    written = write_report(rows, out, plots=not args.no_plots)
    if args.activations:
        row = _pick_run(rows, args.run)
        name = f"activations_{slug(row['model'])}_{row['preset']}_W{row['w_bits']}A{row['a_bits']}.png"
        written["activations"] = plot_run_activations(row, out / name, args.layer, args.act_images,
                                                      weights=args.weights, calib_dir=args.calib_dir)
    print((out / "report.md").read_text())
    for k, v in written.items():
        print(f"{k}: {v}", file=sys.stderr)
    return 0


COMMANDS = (
    Command("report", "Markdown/CSV/JSON tables beside the paper's numbers, and plots",
            cmd_report, _report_args),
)
