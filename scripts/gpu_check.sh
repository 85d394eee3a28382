#!/usr/bin/env bash
# GPU check (issue 8, item 1): calibrate the same model on CUDA and on CPU and compare the scales.
#
#   bash scripts/gpu_check.sh                 # DeiT-S/224, random init, W8A8 ptq4vit, 8 images
#   MODEL=vit_tiny_patch16_224 MODEL_KWARGS='{"img_size": 32, "patch_size": 8, "depth": 1}' IMAGES=4 \
#   N_CANDIDATES=10 bash scripts/gpu_check.sh   # a small run (e.g. to try the CPU half without a GPU)
#
# Prints the CUDA calibration time and the largest relative scale difference; exits 0 when every
# scale agrees within RTOL (default 1e-5), 1 when some do not, 3 when no GPU is visible (after the
# CPU half has run, so that half can be tried anywhere).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
exec env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" - <<'PYEOF'
import copy, json, os, sys, time

import timm
import torch

import ptq4vit

name = os.environ.get("MODEL", "deit_small_patch16_224")
kwargs = json.loads(os.environ.get("MODEL_KWARGS", "{}"))
n_images = int(os.environ.get("IMAGES", "8"))
rtol = float(os.environ.get("RTOL", "1e-5"))
overrides = {"n_candidates": int(os.environ["N_CANDIDATES"])} if "N_CANDIDATES" in os.environ else {}

torch.manual_seed(0)
model = timm.create_model(name, pretrained=False, **kwargs).eval()
size = model.patch_embed.img_size
images = torch.randn(n_images, 3, *size, generator=torch.Generator().manual_seed(1))
print(f"{name} {kwargs or ''} random init, W8A8 ptq4vit {overrides or ''}, {n_images} images {tuple(size)}", flush=True)

t0 = time.perf_counter()
cpu = ptq4vit.quantize(model, images, "ptq4vit", 8, 8, progress=False, **overrides)
print(f"CPU calibration: {time.perf_counter() - t0:.1f} s ({torch.get_num_threads()} threads)", flush=True)

if not torch.cuda.is_available():
    print("gpu_check: FAILED: no CUDA GPU is visible (torch.cuda.is_available() is False); only the CPU half ran",
          file=sys.stderr)
    sys.exit(3)

gpu_model = copy.deepcopy(model).cuda()
torch.cuda.synchronize()
t0 = time.perf_counter()
gpu = ptq4vit.quantize(gpu_model, images, "ptq4vit", 8, 8, progress=False, **overrides)
torch.cuda.synchronize()
print(f"CUDA calibration: {time.perf_counter() - t0:.1f} s on {torch.cuda.get_device_name()}", flush=True)

worst, worst_name, bad = 0.0, "", []
gpu_sites = gpu.sites()
for site_name, site in cpu.sites().items():
    for (buf_name, a), (_, b) in zip(site.named_buffers(), gpu_sites[site_name].named_buffers()):
        if b.device.type != "cuda" or b.dtype != torch.float32:
            bad.append(f"{site_name}.{buf_name} on {b.device} as {b.dtype}")
        rel = float(((b.cpu() - a).abs() / a.abs().clamp_min(torch.finfo(torch.float32).tiny)).max())
        if rel > worst:
            worst, worst_name = rel, f"{site_name}.{buf_name}"
        if rel > rtol:
            bad.append(f"{site_name}.{buf_name}: relative difference {rel:.2e}")
with torch.no_grad():
    probe = images[:2]
    logit_rel = float((gpu(probe.cuda()).cpu() - cpu(probe)).norm() / cpu(probe).norm())
print(f"largest relative scale difference CUDA vs CPU: {worst:.2e} ({worst_name or 'all equal'}); "
      f"logits relative difference {logit_rel:.2e}")
if bad:
    print("gpu_check: FAILED:\n  " + "\n  ".join(bad[:20]), file=sys.stderr)
    sys.exit(1)
print(f"gpu_check: OK, every scale within rtol {rtol:g}")
PYEOF
