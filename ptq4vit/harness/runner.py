"""Experiment runs: one (model, preset, bits, calibration) job → calibrate, evaluate, record.

Used by the ``quantize``, ``sweep`` and ``ablation`` commands. A :class:`Runner` keeps the
current model, its datasets, calibration batches and float accuracy between jobs, writes each
finished run at once to the results JSONL (see :mod:`ptq4vit.results`) and its quantization
parameters to ``<out>/qparams/`` (and, when asked, its checkpoint: :attr:`RunOptions.save`). Jobs whose key is already in the results file are skipped, so
a killed sweep resumes where it stopped.

Under ``torchrun`` every rank runs every job: calibration is repeated on each rank and rank 0's
quantized model is broadcast whole (every parameter and buffer, checked by a digest), evaluation
is sharded, and only rank 0 writes. :func:`run_parallel` instead spreads whole jobs over several
devices (one worker process per GPU, or several CPU workers).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..atomic_write import atomic_write, atomic_write_text
from ..errors import UserError
from ..quant import check_bits as check_quant_bits
from . import zoo
from .data import ImageFolder, calibration_images, reconstruction_draw_size, resolve_splits
from .evaluate import barrier, broadcast_object, dist_info, evaluate
from .fidelity import fidelity
from .labels import slug
from .logs import configure_logging
from .store import ResultsFile, canonical, run_key


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    model: str
    preset: str
    w_bits: int
    a_bits: int
    calib_size: int = 32
    calib_seed: int = 3
    overrides: dict = field(default_factory=dict)
    ablation_row: Optional[int] = None

    @property
    def bits(self) -> str:
        return f"W{self.w_bits}A{self.a_bits}"

    def label(self) -> str:
        ov = "".join(f" {k}={v}" for k, v in sorted(self.overrides.items()))
        ab = f" (ablation row {self.ablation_row})" if self.ablation_row is not None else ""
        return f"{self.model} {self.preset}{ov} {self.bits} calib {self.calib_size}{ab}"


@dataclass
class RunOptions:
    data: Optional[str] = None
    val_split: str = "val"
    calib_split: str = "train"
    val_dir: Optional[str] = None
    calib_dir: Optional[str] = None
    limit_per_class: Optional[int] = None
    strict: bool = False
    weights: Optional[str] = None
    random_init: bool = False
    init_seed: int = 0
    model_kwargs: dict = field(default_factory=dict)
    batch_size: int = 64
    num_workers: int = 0
    device: str = "auto"
    out: str = "runs"
    results: Optional[str] = None
    progress: bool = True
    memory_budget: Optional[int] = None
    reuse_float: bool = True
    #: Write each run's checkpoint (:func:`ptq4vit.save`): the file itself, or with ``save_folder``
    #: a folder that gets one self-named file per run (:func:`run_file_stem`).
    save: Optional[str] = None
    save_folder: bool = False

    def checkpoint_path(self, stem: str) -> Optional[Path]:
        """Where the run named ``stem`` writes its checkpoint (None: it writes none)."""
        if self.save is None:
            return None
        return Path(self.save) / f"{stem}.safetensors" if self.save_folder else Path(self.save)

    @property
    def results_path(self) -> Path:
        return Path(self.results) if self.results else Path(self.out) / "results.jsonl"


# --------------------------------------------------------------------------- validation and planning


def check_bits(w_bits: int, a_bits: int) -> None:
    """Both bit widths in the range the quantizers support (the library's check, one message)."""
    check_quant_bits(w_bits, f"weight bits (in W{w_bits}A{a_bits})")
    check_quant_bits(a_bits, f"activation bits (in W{w_bits}A{a_bits})")


def parse_bits(text: str) -> tuple[int, int]:
    """``"W6A6"``, ``"w8a6"``, ``"6"`` (both) or ``"8/6"`` → (w_bits, a_bits), checked to lie in 2..8."""
    t = text.strip()
    m = re.fullmatch(r"[wW](\d+)[aA](\d+)", t) or re.fullmatch(r"(\d+)[/,:x](\d+)", t)
    if m:
        w, a = int(m.group(1)), int(m.group(2))
    elif re.fullmatch(r"\d+", t):
        w = a = int(t)
    else:
        raise UserError(f"cannot read bit setting {text!r}: write it as W6A6 (or 6 for both)")
    check_bits(w, a)
    return w, a


def check_preset(preset: str, overrides: dict) -> dict:
    """The flat fields ``preset`` with ``overrides`` resolves to, as stored in a results row (JSON values);
    a UserError naming the bad preset, path or field, before any run starts."""
    from ..recipes import get_recipe
    fields = dataclasses.asdict(get_recipe(preset, **overrides).flat())
    del fields["description"]
    return json.loads(json.dumps(fields))


def resolved_recipe(preset: str, overrides: dict) -> dict:
    """The recipe ``preset`` with ``overrides`` resolves to, as JSON data: what a run key hashes, so
    two spellings of one recipe share a key."""
    from ..recipes import get_recipe
    return get_recipe(preset, **overrides).key_dict()


@dataclass
class Resolved:
    """What a job's model and data resolve to, and the keys that identify the run."""
    entry: zoo.ModelEntry
    weights: str                      # "hub", "random-init" or an absolute file path
    model_identity: dict
    eval_dir: Optional[Path]
    calib_dir: Optional[Path]
    key: str
    float_key: str
    identity: dict
    preset_fields: dict               # what the preset resolved to (a stored row made otherwise is stale)


class Planner:
    """Resolves names, paths and keys without loading any model, so bad input fails before work starts."""

    def __init__(self, opts: RunOptions, need_calib: bool = True):
        self.opts = opts
        splits = resolve_splits(opts.data, val_split=opts.val_split, calib_split=opts.calib_split,
                                calib_dir=opts.calib_dir, val_dir=opts.val_dir, need_calib=need_calib)
        self.eval_dir = splits.val_dir.resolve()
        self.calib_dir = splits.calib_dir.resolve() if splits.calib_dir is not None else None
        # Scan the folders now: a missing or empty class folder is reported before any model loads.
        self.eval_set = ImageFolder(self.eval_dir, strict=opts.strict, limit_per_class=opts.limit_per_class,
                                    what="evaluation folder")
        self.calib_set = ImageFolder(self.calib_dir, strict=opts.strict, what="calibration folder") \
            if self.calib_dir is not None else None

    def model_identity(self, name: str) -> tuple[zoo.ModelEntry, str, dict]:
        opts = self.opts
        entry = zoo.resolve(name)
        if opts.weights is not None:
            weights = str(zoo.find_weights(entry, opts.weights).resolve())
        elif opts.random_init:
            weights = "random-init"
        elif entry.local_only:
            raise UserError(f"model {entry.short} has no hub weights: pass --weights FILE "
                            f"({entry.weights_file} or the folder holding it)")
        else:
            weights = "hub"
        ident = {"model": entry.short, "timm": entry.timm_name, "weights": weights,
                 "model_kwargs": opts.model_kwargs or {}}
        if weights == "random-init":
            ident["init_seed"] = opts.init_seed
        return entry, weights, ident

    def resolve(self, job: Job) -> Resolved:
        check_bits(job.w_bits, job.a_bits)
        preset_fields = check_preset(job.preset, job.overrides)
        entry, weights, mident = self.model_identity(job.model)
        if self.calib_set is not None and job.calib_size > len(self.calib_set):
            raise UserError(f"calibration size {job.calib_size} is larger than the {len(self.calib_set)} images "
                            f"in {self.calib_dir}")
        eval_ident = {"eval_dir": str(self.eval_dir), "limit_per_class": self.opts.limit_per_class}
        identity = {**mident, **eval_ident, "preset": job.preset, "recipe": resolved_recipe(job.preset, job.overrides),
                    "w_bits": job.w_bits, "a_bits": job.a_bits, "calib_dir": str(self.calib_dir),
                    "calib_size": job.calib_size, "calib_seed": job.calib_seed, "ablation_row": job.ablation_row}
        return Resolved(entry, weights, mident, self.eval_dir, self.calib_dir, run_key(identity),
                        run_key({**mident, **eval_ident, "float": True}), identity, preset_fields)


def run_file_stem(res: Resolved, job: Job) -> str:
    """The name of a run's files (qparams, checkpoint): model, preset, bits, calibration, and the
    start of the run key, which tells apart runs that differ only in overrides or data."""
    return (f"{slug(res.entry.short)}_{slug(job.preset)}_{job.bits}_c{job.calib_size}_s{job.calib_seed}"
            f"_{res.key[:8]}")


# --------------------------------------------------------------------------- running


def versions() -> dict:
    import timm

    from .. import __version__
    return {"torch": torch.__version__, "timm": timm.__version__, "ptq4vit": __version__,
            "python": platform.python_version()}


def describe_device(device: torch.device, world: int = 1) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        d = f"cuda ({name})"
    else:
        d = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return f"{world}x {d}" if world > 1 else d


def _model_tensors(qmodel: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, the non-persistent buffers included."""
    tensors = dict(qmodel.named_parameters())
    tensors.update(qmodel.named_buffers())
    return tensors


def _layout(qmodel: torch.nn.Module) -> dict:
    """What has to agree across ranks before tensors can be exchanged: every tensor's name, dtype and
    shape, and the kind of every quantizer (:func:`ptq4vit.checkpoint.structure`)."""
    from ..checkpoint import structure
    tensors = {k: [str(t.dtype).replace("torch.", ""), list(t.shape)] for k, t in _model_tensors(qmodel).items()}
    return {"tensors": tensors, "sites": structure(qmodel)["sites"]}


def _layout_difference(ref: dict, other: dict) -> str:
    for part, what in (("tensors", "tensor"), ("sites", "quantization site")):
        a, b = ref[part], other[part]
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return f"{what} {k!r} is {b.get(k, 'absent')} there and {a.get(k, 'absent')} on rank 0"
    return "none"


def _gather(obj) -> list:
    from torch import distributed as dist
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def model_digest(qmodel: torch.nn.Module) -> str:
    """sha256 of a model's whole state: the layout and the value of every parameter and buffer."""
    from ..checkpoint import content_digest
    return content_digest(json.dumps(_layout(qmodel), sort_keys=True), _model_tensors(qmodel))


def check_same_model(qmodel: torch.nn.Module) -> None:
    """Raise unless every rank holds exactly rank 0's model (no-op outside torch.distributed)."""
    if dist_info()[1] == 1:
        return
    digests = _gather(model_digest(qmodel))
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise RuntimeError(f"rank(s) {differ} hold another quantized model than rank 0 (state sha256 "
                           f"{digests[differ[0]][:16]}... vs {digests[0][:16]}...)")


def sync_model(qmodel: torch.nn.Module) -> None:
    """Give every rank rank 0's quantized model: every parameter and buffer, not only the scales.

    Calibration runs on every rank, and rotations, second-order rounding, smoothing, bias
    correction and LayerNorm reparameterization rewrite the weights themselves, so a rank whose
    arithmetic differs (another GPU, a nondeterministic kernel) would otherwise evaluate rank 0's
    scales on its own weights. The layouts are compared first, the result checked by a digest.
    No-op outside torch.distributed.
    """
    rank, world = dist_info()
    if world == 1:
        return
    from torch import distributed as dist
    layouts = _gather(_layout(qmodel))
    for r, other in enumerate(layouts):
        if other != layouts[0]:
            raise UserError(f"torchrun rank {r} calibrated a quantized model of another layout than rank 0: "
                            f"{_layout_difference(layouts[0], other)}; run the same ptq4vit, timm and torch on every rank")
    # nccl exchanges only GPU tensors, gloo CPU ones; sent as bytes, so that every dtype (bool, bf16) goes
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    with torch.no_grad():
        for _, t in sorted(_model_tensors(qmodel).items()):
            if t.numel() == 0:
                continue
            buf = t.detach().to(comm).contiguous()
            dist.broadcast(buf.reshape(-1).view(torch.uint8), src=0)
            if rank != 0:
                t.copy_(buf)
    check_same_model(qmodel)


class Runner:
    """Runs jobs in this process (all ranks of a torchrun group run the same jobs together)."""

    def __init__(self, opts: RunOptions, planner: Optional[Planner] = None, device: Optional[torch.device] = None,
                 log: Callable[[str], None] = None):
        self.opts = opts
        self.planner = planner or Planner(opts)
        self.device = device if device is not None else torch.device("cpu")
        self.results = ResultsFile(opts.results_path)
        self.out = Path(opts.out)
        self.rank, self.world = dist_info()
        self.log = log or logger.info
        self._model_key = None
        self._loaded: Optional[zoo.LoadedModel] = None
        self._eval_set = None
        self._calib_set = None
        self._calib_cache: dict = {}
        self._float_cache: dict = {}

    # ---- caches
    def _load_model(self, res: Resolved) -> zoo.LoadedModel:
        mkey = canonical(res.model_identity)
        if mkey != self._model_key:
            self._loaded = None
            self._calib_cache.clear()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            opts = self.opts
            lm = zoo.create(res.entry.short, weights=None if res.weights in ("hub", "random-init") else res.weights,
                            pretrained=res.weights == "hub", model_kwargs=opts.model_kwargs, init_seed=opts.init_seed)
            lm.model.to(self.device)
            tf = lm.transform()
            self._eval_set = self.planner.eval_set.with_transform(tf)
            if lm.num_classes and len(self._eval_set.classes) > lm.num_classes:
                raise UserError(f"evaluation folder {res.eval_dir} has {len(self._eval_set.classes)} classes but "
                                f"model {lm.name} predicts {lm.num_classes}")
            self._calib_set = self.planner.calib_set.with_transform(tf)
            self._loaded, self._model_key = lm, mkey
        return self._loaded

    def _calibration(self, job: Job, size: Optional[int] = None) -> torch.Tensor:
        """The first ``size`` (default: the job's calibration size) images of the job's calibration draw;
        a larger draw starts with the smaller one (the reconstruction pool holds the calibration images)."""
        ck = (size or job.calib_size, job.calib_seed)
        if ck not in self._calib_cache:
            cal = calibration_images(self._calib_set, ck[0], job.calib_seed,
                                     progress=self.opts.progress and self.rank == 0)
            for p in cal.skipped:
                self.log(f"warning: skipped unreadable calibration image {p}")
            self._calib_cache[ck] = cal.images
        return self._calib_cache[ck]

    def _float_logits_path(self, res: Resolved) -> Path:
        return self.out / "float_logits" / f"{res.float_key}.pt"

    def _float_top1(self, res: Resolved, lm: zoo.LoadedModel):
        """``(top1, n_eval, n_skipped, seconds, logits)`` of the float model; the logits (for agreement and
        KL, docs/lowbit.md §1) are computed once per evaluation set and kept under ``out/float_logits``."""
        if res.float_key in self._float_cache:
            return self._float_cache[res.float_key]
        found = None
        path = self._float_logits_path(res)
        if self.opts.reuse_float:
            for r in self.results.rows():
                if r.get("float_key") == res.float_key and r.get("float_top1") is not None:
                    found = r
            cached = (torch.load(path, map_location="cpu", weights_only=True)
                      if self.rank == 0 and found is not None and path.is_file() else None)
            found = broadcast_object((found, cached) if self.rank == 0 else None)
            found = found if found is not None and found[1] is not None else None
        if found is not None:
            row, logits = found
            val = (row["float_top1"], row.get("n_eval"), row.get("n_skipped", 0), row.get("float_eval_seconds"), logits)
        else:
            r = evaluate(lm.model, self._eval_set, batch_size=self.opts.batch_size, num_workers=self.opts.num_workers,
                         device=self.device, progress=self.opts.progress, desc=f"float {lm.name}", return_logits=True)
            for p in r.skipped_paths:
                self.log(f"warning: skipped unreadable image {p}")
            if self.rank == 0 and r.logits is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(path, lambda f: torch.save(r.logits, f), what="float logits cache")
            val = (r.top1, r.total, r.skipped, round(r.seconds, 3), r.logits)
        self._float_cache[res.float_key] = val
        return val

    # ---- one job
    def run(self, job: Job, *, replace: bool = False) -> dict:
        """Calibrate and evaluate one job; returns its results row (written on rank 0)."""
        import ptq4vit
        res = self.planner.resolve(job)
        lm = self._load_model(res)
        images = self._calibration(job)
        recipe = ptq4vit.get_recipe(job.preset, **job.overrides)
        pool_size = reconstruction_draw_size(recipe, job.calib_size)
        pool = self._calibration(job, pool_size).to(self.device) if pool_size else None
        float_top1, n_eval, n_skipped, float_secs, float_logits = self._float_top1(res, lm)

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        # A UserError (an unsupported module, bad bits ...) reaches the user as one line; anything
        # else from quantize is a bug and keeps its traceback.
        qmodel = ptq4vit.quantize(lm.model, images.to(self.device), recipe, job.w_bits, job.a_bits,
                                  memory_budget=self.opts.memory_budget, reconstruction_images=pool,
                                  progress=self.opts.progress and self.rank == 0)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        calib_seconds = time.perf_counter() - t0
        sync_model(qmodel)
        r = evaluate(qmodel, self._eval_set, batch_size=self.opts.batch_size, num_workers=self.opts.num_workers,
                     device=self.device, progress=self.opts.progress,
                     desc=f"{job.preset} {job.bits} {lm.name}", return_logits=True)
        fid = fidelity(float_logits, r.logits) if float_logits is not None and r.logits is not None else {}
        qparams = qmodel.qparams()
        stem = run_file_stem(res, job)
        checkpoint = self.opts.checkpoint_path(stem)
        if checkpoint is not None and self.rank == 0:
            from ..checkpoint import save
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            save(qmodel, checkpoint, create_kwargs=lm.kwargs, data_config=lm.data_config)
        report = qmodel.reconstruction_report
        del qmodel

        row = {
            "key": res.key,
            "model": lm.name,
            "timm_name": lm.timm_name,
            "timm_tag": lm.tag,
            "weights": res.weights,
            "model_kwargs": self.opts.model_kwargs or {},
            "init_seed": self.opts.init_seed if res.weights == "random-init" else None,
            "preset": job.preset,
            "overrides": dict(job.overrides),
            "preset_fields": res.preset_fields,
            "ablation_row": job.ablation_row,
            "w_bits": job.w_bits,
            "a_bits": job.a_bits,
            "calib_size": job.calib_size,
            "calib_seed": job.calib_seed,
            "calib_dir": str(res.calib_dir),
            "calib_seconds": round(calib_seconds, 3),
            "eval_dir": str(res.eval_dir),
            "limit_per_class": self.opts.limit_per_class,
            "n_eval": r.total,
            "n_skipped": r.skipped,
            "float_top1": float_top1,
            "quant_top1": r.top1,
            "drop": None if float_top1 is None else float_top1 - r.top1,
            "agreement": fid.get("agreement"),
            "kl": fid.get("kl"),
            "reconstruction": None if report is None else report.as_dict(),
            "eval_seconds": round(r.seconds, 3),
            "float_eval_seconds": float_secs,
            "float_key": res.float_key,
            **versions(),
            "device": describe_device(self.device, self.world),
            "world_size": self.world,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if self.rank == 0:
            qdir = self.out / "qparams"
            qdir.mkdir(parents=True, exist_ok=True)
            qpath = qdir / f"{stem}.json"
            atomic_write_text(qpath, json.dumps(qparams, indent=1) + "\n", what="qparams JSON")
            row["qparams"] = str(qpath)
            row["checkpoint"] = None if checkpoint is None else str(checkpoint)
            self.results.append(row, replace=replace)
        barrier()
        return row


# --------------------------------------------------------------------------- job lists


def pending_jobs(planner: Planner, jobs: list[Job], results: ResultsFile,
                 force: bool = False) -> tuple[list[tuple[Job, str]], list[tuple[Job, list[str]]]]:
    """``(job, key)`` for the jobs not yet in ``results`` (all of them with ``force``), duplicates dropped,
    and, among them, ``(job, changed fields)`` for the stale ones: stored under their key by a preset
    that then resolved to other field values (a preset whose definition has changed since). Rows
    written before rows recorded ``preset_fields`` cannot be checked and count as done."""
    stored = {} if force else results.by_key()
    seen, out, stale = set(), [], []
    for job in jobs:
        res = planner.resolve(job)
        if res.key in seen:
            continue
        row = stored.get(res.key)
        if row is not None:
            before = row.get("preset_fields")
            if before is None or before == res.preset_fields:
                continue
            stale.append((job, sorted(k for k in set(before) | set(res.preset_fields)
                                      if before.get(k) != res.preset_fields.get(k))))
        seen.add(res.key)
        out.append((job, res.key))
    return out, stale


def run_serial(runner: Runner, jobs: list[Job], *, replace: bool = False,
               on_row: Optional[Callable[[dict], None]] = None, errors: Optional[list[str]] = None) -> list[dict]:
    """Run ``jobs`` one after the other; return their rows.

    With ``errors`` (a sweep), a job that fails is recorded there as ``"<job label>: <error>"``
    and the next job runs, as :func:`run_parallel` does; without it the first failure raises.
    """
    rows = []
    for i, job in enumerate(jobs, 1):
        if runner.rank == 0:
            runner.log(f"[{i}/{len(jobs)}] {job.label()}")
        if errors is None:
            row = runner.run(job, replace=replace)
        else:
            try:
                row = runner.run(job, replace=replace)
            except UserError as e:
                errors.append(f"{job.label()}: {e}")
                continue
            except Exception as e:  # recorded with its traceback; the sweep goes on
                logger.error("%s failed:\n%s", job.label(), traceback.format_exc())
                errors.append(f"{job.label()}: {type(e).__name__}: {e}")
                continue
        rows.append(row)
        if on_row is not None and runner.rank == 0:
            on_row(row)
    return rows


def _worker(wid: int, device: str, threads: int, opts: RunOptions, jobs_q, out_q, replace: bool) -> None:
    configure_logging(0)  # a spawned process starts with no handlers
    try:
        if threads:
            torch.set_num_threads(threads)
        dev = torch.device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        runner = Runner(opts, device=dev, log=lambda m: logger.info("[worker %d %s] %s", wid, device, m))
    except BaseException as e:  # report and stop
        out_q.put(("fatal", wid, f"{type(e).__name__}: {e}"))
        return
    while True:
        item = jobs_q.get()
        if item is None:
            break
        i, job = item
        try:
            runner.log(f"start {job.label()}")
            row = runner.run(job, replace=replace)
            out_q.put(("row", i, row))
        except UserError as e:
            out_q.put(("error", i, str(e)))
        except BaseException as e:
            out_q.put(("error", i, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    out_q.put(("done", wid, None))


def run_parallel(opts: RunOptions, jobs: list[Job], devices: list[str],
                 on_row: Optional[Callable[[dict], None]] = None,
                 replace: bool = False) -> tuple[list[dict], list[str]]:
    """Run jobs over one worker process per entry of ``devices`` (e.g. every visible GPU); each worker takes
    the next job from a shared queue, and appends its row to the results file as soon as it finishes
    (``replace``: in place of a stored row with its key, as :func:`run_serial`)."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    jobs_q, out_q = ctx.Queue(), ctx.Queue()
    # jobs come in model order; a worker keeps its loaded model while consecutive jobs share it
    for item in enumerate(jobs):
        jobs_q.put(item)
    for _ in devices:
        jobs_q.put(None)
    n_cpu = sum(1 for d in devices if d.startswith("cpu"))
    threads = max(1, (os.cpu_count() or 1) // n_cpu) if n_cpu else 0
    wopts = dataclasses.replace(opts, progress=False)
    procs = [ctx.Process(target=_worker, args=(w, d, threads if d.startswith("cpu") else 0, wopts, jobs_q, out_q,
                                               replace), daemon=False) for w, d in enumerate(devices)]
    for p in procs:
        p.start()
    rows, errors, finished = {}, [], 0
    try:
        while finished < len(procs):
            try:
                kind, i, payload = out_q.get(timeout=5)
            except Exception:
                if not any(p.is_alive() for p in procs):
                    errors.append("a worker process died")
                    break
                continue
            if kind == "row":
                rows[i] = payload
                if on_row is not None:
                    on_row(payload)
            elif kind == "error":
                errors.append(f"{jobs[i].label()}: {payload}")
            elif kind == "fatal":
                errors.append(f"worker {i}: {payload}")
                finished += 1
            elif kind == "done":
                finished += 1
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    return [rows[i] for i in sorted(rows)], errors


def _opt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_rows(rows: list[dict]) -> str:
    """The small table ``quantize`` prints."""
    header = ("model", "preset", "bits", "calib", "images", "float top-1", "quant top-1", "drop", "agree %", "KL",
              "calib s")
    lines = [header]
    for r in rows:
        overrides = dict(r.get("overrides") or {})
        preset = r["preset"]
        if r.get("ablation_row") is not None:
            from .ablations import ABLATION_ROWS
            label, row_ov = ABLATION_ROWS.get(r["ablation_row"], (f"row {r['ablation_row']}", {}))
            preset += f" row {r['ablation_row']} ({label})"
            overrides = {k: v for k, v in overrides.items() if row_ov.get(k, object()) != v}
        preset += "".join(f" {k}={v}" for k, v in sorted(overrides.items()))
        lines.append((r["model"], preset, f"W{r['w_bits']}A{r['a_bits']}", str(r["calib_size"]), str(r["n_eval"]),
                      f"{r['float_top1']:.2f}", f"{r['quant_top1']:.2f}", f"{r['drop']:+.2f}", _opt(r.get("agreement"), ".2f"),
                      _opt(r.get("kl"), ".4f"), f"{r['calib_seconds']:.1f}"))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    right = {3, 4, 5, 6, 7, 8, 9, 10}
    out = []
    for j, line in enumerate(lines):
        out.append("  ".join(str(c).rjust(widths[i]) if i in right else str(c).ljust(widths[i])
                             for i, c in enumerate(line)).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
