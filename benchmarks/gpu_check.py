"""GPU check of the meta-training path, one command on a GPU machine:

    python benchmarks/gpu_check.py [--ways 5 20] [--micro-batch 20] [--steps 3] [--peak-tflops X]

1. **CUDA smoke tests**: ``tests/test_cuda.py`` (masks sampled for CUDA logits, ``stamp prune`` with
   adaptation steps on CUDA, masked features in channels_last against the CPU's, bf16 meta-training), run by
   pytest; ``--skip-smoke`` leaves them out.
2. **A ResNet-50 meta-step at 224×224** (random weights and images: ``episode_memory.build_step``) per
   episode size, in fp32 and under bf16 autocast, in the layout the path uses on the device
   (``devices.memory_format``: channels_last on CUDA) and, for comparison, NCHW: seconds per step, peak
   CUDA memory (and its ratio between the largest and smallest episode), and the FLOPs the step executes
   (``torch.utils.flop_counter``: activation checkpointing's recomputed forwards included,
   so hardware FLOPs) per second, against the device's peak (``--peak-tflops``, else a table of known
   GPUs: dense bf16, and TF32 for fp32 — PyTorch runs fp32 convolutions in TF32 on Ampere and later) = MFU.
   bf16's loss must stay within 5 % of fp32's.
3. **NCCL**, where there are at least 2 GPUs: 2 processes all-reduce a tensor (the sum is checked) and
   time a 256 MiB all-reduce (bus bandwidth, as nccl-tests reports it).

``--device cpu --backbone resnet20 --size 32`` runs part 2 on the CPU (a dry run of the script itself;
parts 1 and 3 need CUDA and say so). Prints a table and writes ``--out`` (JSON). Exit status 1 when a
check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from unittest.mock import patch

import torch

from episode_memory import build_step
from stamp_dist.atomic import write_json

ROOT = Path(__file__).resolve().parents[1]
# Dense peak TFLOP/s (bf16, TF32) by device-name substring: the vendors' data sheets, without sparsity.
PEAKS = {"H200": (989.0, 494.0), "H100": (989.0, 494.0), "A100": (312.0, 156.0), "L40S": (362.0, 183.0)}


def peak_tflops(device: torch.device, precision: str, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, tf32) in PEAKS.items():
        if key in name:
            return bf16 if precision == "bf16" else tf32
    return None


def smoke_tests() -> dict:
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"],
                         cwd=ROOT, capture_output=True, text=True)
    tail = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-300:]
    ok = out.returncode == 0 and "skipped" not in tail
    if not ok:
        print(out.stdout[-6000:], out.stderr[-2000:], sep="\n")
    return {"ok": ok, "summary": tail, "log": out.stdout[-6000:]}


def meta_step(args, device: torch.device, n_way: int, precision: str, layout: str) -> dict:
    """One configuration's numbers. ``layout``: "path" (what ``PrunableBackbone`` does on this device) or
    "nchw" (the backbone and its inputs forced to NCHW, to show what the path's layout buys)."""
    from stamp_dist.pruning import prunable

    with patch.object(prunable, "memory_format", lambda _: torch.contiguous_format) if layout == "nchw" \
            else contextlib.nullcontext():
        net, stamp, episode = build_step(args.backbone, args.size, n_way, args.shots, args.micro_batch, device)
        return _time_step(args, device, net, stamp, episode, precision) | {"n_way": n_way, "layout": layout}


def _time_step(args, device, net, stamp, episode, precision) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from stamp_dist.devices import autocast
    from stamp_dist.meta.objective import episode_loss

    def step() -> float:
        stamp.zero_grad(set_to_none=True)
        with autocast(device, precision):
            out = episode_loss(net, stamp, episode, torch.Generator(device=device).manual_seed(1))
        out.loss.backward()
        return float(out.loss.detach())

    with FlopCounterMode(display=False) as counter:
        loss = step()  # also the warm-up (cuDNN autotuning, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    seconds = sorted(times)[len(times) // 2]
    busy = None
    if args.profile and device.type == "cuda":
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize(device)
        events = prof.key_averages()
        kernels = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
        busy = kernels / 1e6 / seconds  # time in kernels / step time
        print(events.table(sort_by="self_device_time_total", row_limit=12))
    flops = counter.get_total_flops()
    peak = peak_tflops(device, precision, args.peak_tflops)
    tflops = flops / seconds / 1e12
    return {"images": len(episode.support_y) + len(episode.query_y), "precision": precision, "loss": loss,
            "seconds": seconds, "tflop_per_step": flops / 1e12, "tflops": tflops,
            "mfu": tflops / peak if peak else None, "gpu_busy": busy,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def _nccl_worker(rank: int, world: int, port: int, result_file: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    x = torch.full((1024,), float(rank + 1), device="cuda")
    dist.all_reduce(x)
    correct = bool(torch.all(x == world * (world + 1) / 2))
    big = torch.ones(64 * 2**20, device="cuda")  # 256 MiB of fp32
    for _ in range(3):
        dist.all_reduce(big)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        dist.all_reduce(big)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / 10
    if rank == 0:
        size = big.numel() * big.element_size()
        Path(result_file).write_text(json.dumps({"ok": correct, "allreduce_256mib_ms": seconds * 1e3,
                                                 "bus_gb_s": size / seconds * 2 * (world - 1) / world / 1e9}))
    dist.destroy_process_group()


def nccl_check(tmp: Path) -> dict:
    import torch.multiprocessing as mp

    result = tmp / "nccl.json"
    mp.spawn(_nccl_worker, args=(2, 29533, str(result)), nprocs=2, join=True)
    return json.loads(result.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--ways", type=int, nargs="+", default=[5, 20])
    ap.add_argument("--shots", type=int, default=10, help="support (= query) images per class")
    ap.add_argument("--micro-batch", type=int, default=20, help="runtime.micro_batch")
    ap.add_argument("--layouts", nargs="+", default=["path", "nchw"], choices=["path", "nchw"],
                    help="path: the layout PrunableBackbone uses on the device; nchw: forced NCHW, for comparison")
    ap.add_argument("--steps", type=int, default=3, help="timed meta-steps per configuration (median)")
    ap.add_argument("--skip-smoke", action="store_true", help="leave out part 1 (the CUDA smoke tests)")
    ap.add_argument("--profile", action="store_true", help="also profile one step per configuration (CUDA): the "
                    "busiest kernels, and the share of the step the GPU spent in kernels")
    ap.add_argument("--peak-tflops", type=float, help="the device's peak, when not in the built-in table")
    ap.add_argument("--out", default="gpu_check.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda" and torch.cuda.is_available()
    if device.type == "cuda" and not cuda:
        print("no CUDA device: run this on a GPU machine (or --device cpu for a dry run of part 2)")
        return 2
    report: dict = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
                    "gpus": torch.cuda.device_count() if cuda else 0, "args": vars(args)}
    print(f"{report['device']}, {report['gpus']} GPU(s), torch {torch.__version__}")
    report["smoke"] = smoke_tests() if cuda and not args.skip_smoke else {"ok": None, "summary": "not run"}
    print(f"CUDA smoke tests: {report['smoke']['summary']}")

    print(f"{args.backbone} {args.size}x{args.size}, {args.shots}+{args.shots} per class, micro-batch {args.micro_batch}")
    print(f"{'way':>4} {'images':>7} {'precision':>9} {'layout':>6} {'s/step':>8} {'TFLOP/step':>11} {'TFLOP/s':>8} "
          f"{'MFU':>6} {'peak GiB':>9} {'loss':>8}")
    report["steps"] = []
    for n_way in args.ways:
        for precision in ("fp32", "bf16"):
            for layout in args.layouts:
                r = meta_step(args, device, n_way, precision, layout)
                report["steps"].append(r)
                mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
                mem = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "-"
                busy = f" GPU busy {r['gpu_busy']:.0%}" if r["gpu_busy"] is not None else ""
                print(f"{n_way:>4} {r['images']:>7} {precision:>9} {layout:>6} {r['seconds']:>8.3f} "
                      f"{r['tflop_per_step']:>11.3f} {r['tflops']:>8.2f} {mfu:>6} {mem:>9} {r['loss']:>8.4f}{busy}", flush=True)
    fp32 = {(r["n_way"], r["layout"]): r["loss"] for r in report["steps"] if r["precision"] == "fp32"}
    report["bf16_ok"] = all(abs(r["loss"] - fp32[key]) <= 0.05 * abs(fp32[key]) for r in report["steps"]
                            if r["precision"] == "bf16" and (key := (r["n_way"], r["layout"])))
    print(f"bf16 loss within 5 % of fp32: {report['bf16_ok']}")
    if cuda and len(args.ways) > 1:
        for precision in ("fp32", "bf16"):
            mem = {r["n_way"]: r["peak_mem_gib"] for r in report["steps"]
                   if r["precision"] == precision and r["layout"] == args.layouts[0]}
            ratio = mem[max(args.ways)] / mem[min(args.ways)]
            print(f"peak memory {precision}, {args.layouts[0]}: {max(args.ways)}-way / {min(args.ways)}-way = {ratio:.2f}")

    if cuda and torch.cuda.device_count() >= 2:
        report["nccl"] = nccl_check(Path(args.out).resolve().parent)
        n = report["nccl"]
        print(f"NCCL, 2 processes: all-reduce correct {n['ok']}, 256 MiB in {n['allreduce_256mib_ms']:.2f} ms "
              f"({n['bus_gb_s']:.0f} GB/s bus bandwidth)")
    else:
        report["nccl"] = {"ok": None, "summary": "needs 2 GPUs"}
        print("NCCL: skipped (needs 2 GPUs)")
    write_json(Path(args.out), report)
    failed = report["smoke"]["ok"] is False or not report["bf16_ok"] or report["nccl"]["ok"] is False
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
