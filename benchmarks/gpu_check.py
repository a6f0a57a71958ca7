"""One short script for a lent GPU: checks the CUDA-graph step against the eager one, then times
training, sampling and Inception feature extraction. Each part runs in its own try block with its
own time budget and appends its result to OUT/gpu_check.json as it goes, so a run cut short still
reports what it measured.

    PYTHONPATH=. python benchmarks/gpu_check.py --data .devdata/fashion-mnist --out $OUT [--parts equivalence,train,...]

Parts (run in the order --parts names them, so a lease that ends mid-call keeps the most important):
equivalence, train (graphed and eager, at the defaults), train_graphed (the same, graphed only), train_fuse (fused
BN + activation at batch 64 and 128), fusion (fused on/off at 1024 and 256), vs_reference
(benchmarks/train_speed.py), profile (GPU time per kernel family of an eager step at batch 1024), copies
(GPU time of copies and convolutions by input shape), one_channel (benchmarks/one_channel.py), subpixel
(train.subpixel_convs on/off at 1024, 256 and 64, unpadded and padded to 8 channels, each half alone at 1024),
adopt_best (the later parts run with subpixel's fastest batch-1024 setting, if any beat it off), presets (three
other presets at the defaults: the sub-pixel rewrites in them, finite losses), train_eager (the eager step at
batch 64 and 128 with fusion and the rewrites each on and off), cudnn_search (cuDNN's benchmark
trying all algorithms, not 10, at 1024, each run in its own process: b1024), b1024 (one run at the defaults), rollback, resume, eval (`aigc eval` wall times),
fid_agreement (needs pytorch-fid), sample. On 2026-11-29 on an H200 one call of fusion, train, vs_reference,
sample, train_fuse, equivalence, rollback, resume, profile, eval and fid_agreement took 411 s, and one of
resume, rollback, train_graphed, sample, fid_agreement and copies 308 s (see benchmarks/README.md); a machine there starts bare, so carry the Fashion-MNIST files
(and a pytorch-fid wheel) with the call. `--device cpu --steps-scale 0.01` smoke-tests the parts that
do not need CUDA here (minutes).
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

RESULTS: dict = {}
STEPS_SCALE = 1.0
DEVICE = "cuda"  # --device cpu: a smoke test of the parts that allow it, on a machine without a GPU
AIGC_SETS: dict = {}  # --aigc-set: over each part's base settings, under what a part sets on purpose


# Scratch runs, caches and weights: one folder, removed at exit (about 1.5 GB per run, on a shared disk here).
SCRATCH = Path(tempfile.mkdtemp(prefix="aigc-gpu-check-"))
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)
STOPPING = []  # set by SIGTERM outside train(); inside, train() turns the signal into its Interrupted


def stopped(e: BaseException) -> bool:
    """Whether `e` is the stop `timeout` asked for, not a part's failure: the script must end, not go on."""
    return bool(STOPPING) or type(e).__name__ == "Interrupted"


def _stop(*_):
    STOPPING.append(True)
    sys.exit(143)


signal.signal(signal.SIGTERM, _stop)  # `timeout` stops with SIGTERM: atexit still runs


def fresh(name: str) -> Path:
    """A run folder in SCRATCH, emptied first: a rerun (or the next part) must not find an earlier run there."""
    path = SCRATCH / name
    shutil.rmtree(path, ignore_errors=True)
    return path


def record(out: Path, name: str, value) -> None:
    RESULTS[name] = value
    (out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1))
    print(f"== {name}: {json.dumps(value)[:2000]}", flush=True)


def attempt(fn, *args, trace: int = 800):
    """fn(*args), or {"error", "trace"} where it fails: one failed part, or run within a part, must not cost
    the others. The stop `timeout` asked for ends the script instead."""
    try:
        return fn(*args)
    except Exception as e:
        if stopped(e):
            raise SystemExit(143) from e
        return {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-trace:]}


def part(out: Path, name: str, fn, *args) -> None:
    t0 = time.perf_counter()
    value = attempt(fn, *args, trace=1500)
    if isinstance(value, dict):
        value["seconds"] = round(time.perf_counter() - t0, 1)
    record(out, name, value)


def graph_equivalence(data_dir: str) -> dict:
    """Eager vs captured step, same seed, fp32 with TF32 off: the per-step losses of the two."""
    from aigc_cli.config import load_preset
    from aigc_cli.training.loop import train
    from conftest import Silent

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = {}
    for precision in ("fp32", "bf16"):
        runs = {}
        for graph in ("off", "on"):
            cfg = load_preset("fashion-mnist-dcgan").with_overrides({
                "data.source": data_dir, "data.limit": 4096, "train.epochs": 0, "train.steps": 12, "train.log_every": 1,
                "train.sample_every": 1000, "train.ckpt_every": 1000, "train.precision": precision,
                "train.cuda_graph": graph, "train.batch_size": 64, "train.device": "cuda",
                "train.subpixel_convs": "on"})  # auto would rewrite the graphed run only: not the graph alone
            rep = Silent()
            train(cfg, fresh(f"graph-eq-{precision}-{graph}"), rep)
            runs[graph] = [(r["loss_d"], r["loss_g"]) for r in rep.records]
            runs[graph + "_notes"] = rep.notes
        diffs = [max(abs(a - b) / max(abs(a), 1e-6) for a, b in zip(e, g)) for e, g in zip(runs["off"], runs["on"])]
        out[precision] = {"max_rel_diff_per_step": [round(d, 6) for d in diffs], "eager": runs["off"],
                          "graph": runs["on"], "notes": runs["on_notes"]}
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return out


def aigc_train_speed(data_dir: str, batch: int, graph: str, steps: int, sets: dict | None = None) -> dict:
    from aigc_cli.config import load_preset
    from aigc_cli.training.loop import train
    from conftest import Silent

    cfg = load_preset("fashion-mnist-dcgan").with_overrides({
        "data.source": data_dir, "train.epochs": 0, "train.steps": max(4, int(steps * STEPS_SCALE)),
        "train.log_every": max(2, int(steps * STEPS_SCALE) // 10),
        "train.sample_every": 10**6, "train.ckpt_every": 10**6, "train.batch_size": batch,
        "train.cuda_graph": graph, "train.device": DEVICE, **AIGC_SETS, **(sets or {})})
    rep = Silent()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    summary = train(cfg, fresh(f"speed-{batch}-{graph}"), rep)
    rates = sorted(r["img_per_s"] for r in rep.records[1:])
    return {"batch": batch, "graph": graph, "fuse": cfg.train.fuse_norm_act, "sets": sets, "img_per_s_median": rates[len(rates) // 2] if rates else None,
            "img_per_s_all": [r["img_per_s"] for r in rep.records], "wall_s": round(time.perf_counter() - t0, 1),
            "precision": summary["precision"],
            "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEVICE == "cuda" else None,
            "notes": rep.notes}


def keep(result: dict, *keys: str) -> dict:
    return {k: result[k] for k in keys}


def run_cmd(cmd: list[str], timeout: int, env: dict | None = None) -> dict:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                           env={**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join(
                               filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
        return {"rc": p.returncode, "stdout": p.stdout[-3000:], "stderr": p.stderr[-2000:],
                "wall_s": round(time.perf_counter() - t0, 1)}
    except subprocess.TimeoutExpired as e:
        return {"rc": "timeout", "stdout": (e.stdout or b"")[-3000:].decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")[-3000:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", required=True, help="Fashion-MNIST IDX folder")
    ap.add_argument("--out", required=True, help="folder for gpu_check.json and logs")
    ap.add_argument("--parts", default="all", help="comma list of parts to run (default all)")
    ap.add_argument("--device", default="cuda", help="cpu: smoke-test the fusion and profile parts without a GPU")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply the step counts (smoke tests: 0.05)")
    ap.add_argument("--aigc-set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. train.subpixel_convs=on (repeatable), for the trainings this script "
                         "runs itself (not equivalence, and not the other benchmark scripts it calls); a part's own "
                         "settings (batch sizes, steps, what it compares) win over it")
    ap.add_argument("--subpixel-pad", type=int,
                    help="aigc_cli.training.subpixel.PAD_CHANNELS for this process (default: aigc's own)")
    ap.add_argument("--subpixel-kinds",
                    help="aigc_cli.training.subpixel.KINDS for this process: conv, transposed or conv,transposed "
                         "(default: aigc's own)")
    ap.add_argument("--cudnn-benchmark-limit", type=int,
                    help="torch.backends.cudnn.benchmark_limit for this process (0: cuDNN tries every algorithm)")
    args = ap.parse_args()
    global DEVICE, STEPS_SCALE
    DEVICE, STEPS_SCALE = args.device, args.steps_scale
    from aigc_cli.training import subpixel

    if args.subpixel_pad is not None:
        subpixel.PAD_CHANNELS = args.subpixel_pad
    if args.subpixel_kinds is not None:
        kinds = tuple(args.subpixel_kinds.split(","))
        if not kinds or not set(kinds) <= {"conv", "transposed"}:
            sys.exit(f"--subpixel-kinds takes conv, transposed or both, got {args.subpixel_kinds!r}")
        subpixel.KINDS = kinds
    if args.cudnn_benchmark_limit is not None:
        torch.backends.cudnn.benchmark_limit = args.cudnn_benchmark_limit
    bad = [item for item in args.aigc_set if "=" not in item]
    if bad:
        sys.exit(f"--aigc-set takes KEY=VALUE, got {', '.join(bad)}")
    AIGC_SETS.update(item.split("=", 1) for item in args.aigc_set)
    from aigc_cli.config import load_preset
    from aigc_cli.errors import UsageError

    try:  # a misspelt key or a bad value fails here, at once, not in each part
        load_preset("fashion-mnist-dcgan").with_overrides(AIGC_SETS)
    except UsageError as e:
        sys.exit(f"--aigc-set: {e}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record(out, "device", {"name": torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE, "torch": torch.__version__})

    # In the order asked: a lease may end mid-call, so the parts that matter most go first.
    names = list(PARTS) if args.parts == "all" else args.parts.split(",")
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        sys.exit(f"unknown parts: {', '.join(unknown)} (known: {', '.join(PARTS)})")
    for name in names:
        PARTS[name](args, out)

    def brief(v):  # images/s where a part measured them (one run or several), else whether it failed
        if not isinstance(v, dict):
            return v
        if "img_per_s_median" in v:
            return v["img_per_s_median"]
        inner = {k: brief(x) for k, x in v.items() if isinstance(x, dict)}
        return inner or ("error" if "error" in v else "done")

    print(json.dumps({k: brief(v) for k, v in RESULTS.items()}, indent=1))


def _dcgan(data_dir: str, device: str, steps: int, **extra):
    from aigc_cli.config import load_preset

    return load_preset("fashion-mnist-dcgan").with_overrides({
        "data.source": data_dir, "data.limit": 4096, "train.epochs": 0, "train.steps": steps, "train.log_every": 10,
        "train.sample_every": 10**6, "train.ckpt_every": 10, "train.batch_size": 64, "train.device": device,
        **AIGC_SETS, **extra})


def rollback_under_graph(args, out) -> dict:
    """Poison G's weights in place after step 15 (outside the graph, so the replays carry the NaN on): the
    guard must roll back to step 10, re-capture, and finish with finite weights."""
    from aigc_cli.training.loop import train
    from conftest import Silent

    class Poison(Silent):
        def advance(self, step):
            if step == 15 and not getattr(self, "done", False):
                self.done = True
                with torch.no_grad():
                    next(self.nets["G"].parameters()).fill_(float("inf"))

    rep = Poison()
    import aigc_cli.training.loop as loop_mod
    real_build = loop_mod.build_nets

    def keep(model_cfg):  # hand the reporter the networks it poisons
        nets = real_build(model_cfg)
        rep.nets = nets
        return nets

    loop_mod.build_nets = keep
    try:
        summary = train(_dcgan(args.data, DEVICE, 40), fresh("gpu-rollback"), rep)
    finally:
        loop_mod.build_nets = real_build
    return {"recoveries": summary["recoveries"], "steps": summary["steps"], "notes": rep.notes,
            "losses": [(r["step"], r["loss_d"], r["loss_g"]) for r in rep.records],
            "ok": summary["recoveries"] == 1 and all(map(math.isfinite, [r["loss_d"] for r in rep.records[-2:]]))}


def resume_under_graph(args, out) -> dict:
    """A checkpoint written by a graphed run resumes in a graphed run (capturable Adam state restored)."""
    from aigc_cli import checkpoint as ckpt_io
    from aigc_cli.training.loop import train
    from conftest import Silent

    run = fresh("gpu-resume")
    train(_dcgan(args.data, DEVICE, 20), run, Silent())
    rep = Silent()
    summary = train(_dcgan(args.data, DEVICE, 40), run, rep, resume=ckpt_io.load(run / "checkpoints" / "last.safetensors"))
    return {"start_step": summary["start_step"], "steps": summary["steps"], "notes": rep.notes,
            "losses": [(r["step"], r["loss_d"], r["loss_g"]) for r in rep.records],
            "ok": summary["start_step"] == 20 and all(math.isfinite(r["loss_d"]) for r in rep.records)}


def fid_agreement(args, out) -> dict:
    return run_cmd([sys.executable, "benchmarks/fid_agreement.py", "--make-folders", str(SCRATCH / "fa"), "--data", args.data,
                    "--n", "5000", "--random-weights"], timeout=240)


def fusion_speed(args, out) -> dict:
    """train.fuse_norm_act on/off at the compute-bound batch sizes, graphed (the 100k img/s goal is at 1024)."""
    res = {}
    for batch, steps in ((1024, 150), (256, 300)):
        for fuse in ("on", "off"):
            r = aigc_train_speed(args.data, batch, "auto", steps, {"train.fuse_norm_act": fuse})  # explicit on/off
            res[f"b{batch}_fuse_{fuse}"] = keep(r, "img_per_s_median", "wall_s", "peak_gb", "notes")
    return res


def subpixel_speed(args, out) -> dict:
    """train.subpixel_convs on/off at the defaults otherwise (graphed, fused), alternating, unpadded and with the
    narrow side padded to 8 channels (subpixel.PAD_CHANNELS), and at batch 1024 each rewrite alone: whether
    `auto` should turn it (or one half) on for CUDA, and with which padding. 1024 first: the 100k img/s goal."""
    from aigc_cli.training import subpixel

    res = {}
    both = ("conv", "transposed")
    before = subpixel.KINDS, subpixel.PAD_CHANNELS
    runs = [(1024, 150, "on", both, 0), (1024, 150, "off", both, 0), (1024, 150, "on", both, 8),
            (1024, 150, "on", ("conv",), 8), (1024, 150, "on", ("transposed",), 8), (1024, 150, "on", ("conv",), 0),
            (1024, 150, "on", ("transposed",), 0), (256, 300, "on", both, 8), (256, 300, "off", both, 0),
            (256, 300, "on", both, 0), (64, 600, "on", both, 8), (64, 600, "off", both, 0), (64, 600, "on", both, 0)]
    for batch, steps, setting, kinds, pad in runs:
        subpixel.KINDS, subpixel.PAD_CHANNELS = kinds, pad
        name = f"b{batch}_{setting}" + ("" if kinds == both else f"_{kinds[0]}") + (f"_pad{pad}" if pad else "")
        try:
            res[name] = attempt(lambda: keep(aigc_train_speed(args.data, batch, "auto", steps,
                                                              sets={"train.subpixel_convs": setting}),
                                             "img_per_s_median", "wall_s", "peak_gb", "notes"))
        finally:
            subpixel.KINDS, subpixel.PAD_CHANNELS = before
        record(out, "subpixel_so_far", res)  # a lease that ends mid-part keeps what it measured
    return res


def adopt_best(args, out) -> dict:
    """After `subpixel`: the parts after this one (train_graphed, cudnn_search) run with the fastest of its
    batch-1024 settings, where that beat the rewrites off by more than 2%."""
    from aigc_cli.training import subpixel

    runs = {k: v["img_per_s_median"] for k, v in RESULTS.get("subpixel", {}).items()
            if k.startswith("b1024_") and isinstance(v, dict) and v.get("img_per_s_median")}
    if "b1024_off" not in runs:
        return {"adopted": None, "why": "no subpixel results at batch 1024"}
    best = max(runs, key=runs.get)
    if best == "b1024_off" or runs[best] < 1.02 * runs["b1024_off"]:
        return {"adopted": None, "runs": runs}
    words = best.split("_")[2:]  # b1024_on[_conv|_transposed][_padN]
    pad = int(words.pop()[3:]) if words and words[-1].startswith("pad") else 0
    subpixel.KINDS, subpixel.PAD_CHANNELS = (tuple(words) or ("conv", "transposed")), pad
    AIGC_SETS["train.subpixel_convs"] = "on"
    return {"adopted": best, "kinds": subpixel.KINDS, "pad": pad, "runs": runs}


def eager_speed(args, out) -> dict:
    """The eager step (cuda_graph off, where a gradient penalty or n_critic > 1 sends it) at the launch-bound
    batch sizes, with the fused pairs and the sub-pixel rewrites each on and off: both add launches and host
    work per step, which a CUDA graph hides and an eager step pays. Whether `auto` should leave either off there."""
    res = {}
    for batch, steps in ((64, 400), (128, 300)):
        settings = [(f, s) for f in ("on", "off") for s in ("on", "off")]
        for fuse, sub in settings if batch == 64 else settings[::-1]:  # the order turned round against drift
            name = f"b{batch}_fuse_{fuse}_subpixel_{sub}"
            res[name] = attempt(lambda: keep(aigc_train_speed(args.data, batch, "off", steps, {
                "train.fuse_norm_act": fuse, "train.subpixel_convs": sub}), "img_per_s_median", "img_per_s_all",
                "wall_s", "notes"))
            record(out, "train_eager_so_far", res)
    return res


def presets_at_defaults(args, out) -> dict:
    """Other Fashion-MNIST presets, 30 steps each at the defaults on the device: whether the sub-pixel rewrites
    (auto: one-channel layers of graphed CUDA steps; --aigc-set train.subpixel_convs=on for all) run in them
    (WGAN-GP differentiates D twice; a conditional D has more input channels than the rewrite takes), how many
    layers each rewrote, and that the losses stay finite."""
    from aigc_cli.config import load_preset
    from aigc_cli.training import subpixel
    from aigc_cli.training.loop import train
    from conftest import Silent

    def one(name: str) -> dict:
        cfg = load_preset(name).with_overrides({
            "data.source": args.data, "data.limit": 4096, "train.epochs": 0, "train.steps": 30,
            "train.log_every": 10, "train.sample_every": 10**6, "train.ckpt_every": 10**6,
            "train.device": DEVICE, **AIGC_SETS})
        rep = Silent()
        t0 = time.perf_counter()
        train(cfg, fresh(f"preset-{name}"), rep)
        losses = [{k: v for k, v in r.items() if k.startswith("loss")} for r in rep.records]
        return {"rewritten": sum(counts), "losses": losses, "notes": rep.notes,
                "finite": all(math.isfinite(v) for d in losses for v in d.values()),
                "wall_s": round(time.perf_counter() - t0, 1)}

    real = subpixel.use_subpixel
    res = {}
    for name in ("fashion-mnist-wgan-gp", "fashion-mnist-cond-dcgan", "fashion-mnist-vae"):
        counts = []
        subpixel.use_subpixel = lambda *a: counts.append(real(*a)) or counts[-1]  # (net, format, limit)
        try:
            res[name] = attempt(one, name)
        finally:
            subpixel.use_subpixel = real
        record(out, "presets_so_far", res)
    return res


def cudnn_search_speed(args, out) -> dict:
    """cuDNN's benchmark mode tries 10 algorithms per convolution by default (torch.backends.cudnn.benchmark_limit);
    0 tries all. At batch 1024, graphed and fused: whether a kernel outside the first 10 is faster. Each run in
    its own process: torch caches the algorithm it picked per convolution shape for the life of a process,
    whatever the limit, so in this one the first search would decide for all."""
    res = {}
    for i, limit in enumerate((0, 10, 0, 10)):  # twice each, alternating
        sub = out / f"cudnn-search-{limit}-{'ab'[i // 2]}"
        cmd = [sys.executable, "benchmarks/gpu_check.py", "--data", args.data, "--out", str(sub), "--device", DEVICE,
               "--steps-scale", str(STEPS_SCALE), "--parts", "b1024", "--cudnn-benchmark-limit", str(limit)]
        from aigc_cli.training import subpixel

        cmd += ["--subpixel-pad", str(subpixel.PAD_CHANNELS), "--subpixel-kinds", ",".join(subpixel.KINDS)]
        r = run_cmd(cmd + [f"--aigc-set={k}={v}" for k, v in AIGC_SETS.items()], timeout=240)
        try:
            got = json.loads((sub / "gpu_check.json").read_text())["b1024"]
            res[f"limit_{limit}_{'ab'[i // 2]}"] = {k: got.get(k) for k in ("img_per_s_median", "wall_s", "error")}
        except (OSError, ValueError, KeyError):
            res[f"limit_{limit}_{'ab'[i // 2]}"] = {"error": r}
        record(out, "cudnn_search_so_far", res)
    return res


def kernel_profile(args, out) -> dict:
    """Where the GPU time of an eager step goes at batch 1024 (eager: a replayed graph hides its kernels),
    by kernel family, with and without fusion: what any further speed-up can still win."""
    from aigc_cli.training.loop import train
    from conftest import Silent

    # First match wins: inductor's kernels carry aten names (batch_norm) inside "triton_...", and
    # "conv" must not catch "convert".
    families = [("fused (compiled)", ("triton", "cpp_fused", "compiledfunction")), ("batch_norm", ("batch_norm", "bn_fw", "bn_bw", "welford", "bn_")),
                ("activation", ("leaky", "relu", "threshold", "tanh")), ("adam", ("adam",)),
                ("copy/cast", ("copy", "cast", "convert", "to_copy")),
                ("conv", ("conv", "cudnn", "xmma", "implicit", "gemm", "sm90", "sm80", "dgrad", "wgrad", "fprop")),
                ("other elementwise", ("elementwise",)), ("reduce", ("reduce",))]
    res = {}
    activity = torch.profiler.ProfilerActivity.CUDA if DEVICE == "cuda" else torch.profiler.ProfilerActivity.CPU
    steps = 50 if DEVICE == "cuda" else 6  # the first call of each fused layer runs once more (a probe)
    for fuse in ("off", "on"):
        extra = {"train.batch_size": 1024 if DEVICE == "cuda" else 64, "data.limit": 0, "train.cuda_graph": "off",
                 "train.fuse_norm_act": fuse, "train.log_every": steps, "train.ckpt_every": 10**6}
        # An unprofiled run first: compiling (and cuDNN's benchmark search) must not count.
        train(_dcgan(args.data, DEVICE, 4, **extra), fresh(f"profile-warm-{fuse}"), Silent())
        rep = Silent()
        with torch.profiler.profile(activities=[activity]) as prof:
            train(_dcgan(args.data, DEVICE, steps, **extra), fresh(f"profile-{fuse}"), rep)
            if DEVICE == "cuda":
                torch.cuda.synchronize()
        totals: dict[str, float] = {}
        kernels = []
        for ev in prof.key_averages():
            t = (getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
                 if DEVICE == "cuda" else ev.self_cpu_time_total)
            if not t:
                continue
            name = ev.key.lower()
            fam = next((f for f, keys in families if any(k in name for k in keys)), "other")
            totals[fam] = totals.get(fam, 0.0) + t / 1e3
            kernels.append((round(t / 1e3, 1), ev.count, ev.key[:120]))
        total = sum(totals.values())
        res[f"fuse_{fuse}"] = {"ms_per_step_by_family": {k: round(v / steps, 3) for k, v in sorted(totals.items())},
                               "ms_per_step": round(total / steps, 3), "top_kernels_ms_total": sorted(kernels)[::-1][:25],
                               "notes": rep.notes}
    return res


def eval_speed(args, out) -> dict:
    """`aigc eval` of a short DCGAN run: FID+IS at 10k (real statistics computed, then a cache hit) and
    all metrics at 10k, with random Inception weights in the real layout (timing only)."""

    from aigc_cli.training.loop import train
    from conftest import Silent
    from test_inception import random_state_dict

    run = fresh("gpu-eval-run")
    train(_dcgan(args.data, DEVICE, 20, **{"data.limit": 0}), run, Silent())
    weights = Path(tempfile.mkdtemp(dir=SCRATCH)) / "random-inception.pth"
    torch.save(random_state_dict(), weights)
    env = {"AIGC_UNVERIFIED_INCEPTION_WEIGHTS_FOR_TESTS": "1", "AIGC_CACHE_DIR": tempfile.mkdtemp(dir=SCRATCH)}
    n = "10000" if DEVICE == "cuda" else "20"
    base = [sys.executable, "-m", "aigc_cli", "eval", str(run), "--data", args.data, "--n", n,
            "--inception-weights", str(weights), "--json", "--device", DEVICE]
    res = {}
    for name, extra in (("fid_is_cold", ["--metrics", "fid,is"]), ("fid_is_cached", ["--metrics", "fid,is"]),
                        ("all_cached", []), ("fid_bf16_cold", ["--metrics", "fid", "--precision", "bf16"]),
                        ("fid_bf16_cached", ["--metrics", "fid", "--precision", "bf16"])):
        r = run_cmd(base + extra, timeout=300, env=env)
        res[name] = {"rc": r.get("rc"), "wall_s": r.get("wall_s"), "stdout": r.get("stdout", "")[:400],
                     "stderr": r.get("stderr", "")[-600:]}
    return res


def sample_speed(args, out) -> dict:
    return run_cmd([sys.executable, "benchmarks/sample_speed.py", "--device", "cuda", "--n", "50000", "--data", args.data,
                    "--batch-size", "4096", "--repeats", "2"], timeout=240)


def train_speeds(args, out, fuse: str | None = None, batches=(64, 128, 256, 1024), graphs=("auto", "off")) -> None:
    """aigc's train() at each batch size, graphed and eager (fuse None: the preset's setting): one record per run."""
    for batch in batches:
        steps = {64: 600, 128: 500, 256: 300, 1024: 120}[batch]
        for graph in graphs:
            suffix = f"_fuse_{fuse}" if fuse else ""
            part(out, f"aigc_train_b{batch}_graph_{graph}{suffix}", aigc_train_speed, args.data, batch, graph, steps,
                 {"train.fuse_norm_act": fuse} if fuse else None)


def vs_reference(args, out) -> dict:
    """benchmarks/train_speed.py on the GPU: the pytorch/examples loop against aigc at its defaults."""
    r = run_cmd([sys.executable, "benchmarks/train_speed.py", "--device", DEVICE, "--batch-sizes", "64,256,1024",
                 "--workers", "64:2,256:12,1024:12", "--precision", "auto", "--steps", "200", "--warmup", "100",
                 "--interval", "50", "--repeats", "1", "--data", args.data, "--json", str(out / "train_speed.json")],
                timeout=300)
    return r


def layout_copies(args, out) -> dict:
    """Which ops of an eager step at batch 1024 copy or convert whole tensors (layout changes, casts), with
    their input shapes and GPU time: what is left between the convolutions after fusion."""
    from aigc_cli.training.loop import train
    from conftest import Silent

    extra = {"train.batch_size": 1024 if DEVICE == "cuda" else 64, "data.limit": 0, "train.cuda_graph": "off",
             "train.fuse_norm_act": "on", "train.log_every": 10, "train.ckpt_every": 10**6}
    train(_dcgan(args.data, DEVICE, 4, **extra), fresh("copies-warm"), Silent())
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
        train(_dcgan(args.data, DEVICE, 10, **extra), fresh("copies"), Silent())
    keys = ("copy_", "_to_copy", "contiguous", "clone", "convolution", "cat", "batch_norm")
    rows = []
    for ev in prof.key_averages(group_by_input_shape=True):
        if any(k in ev.key for k in keys):
            dev = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
            rows.append((round(dev / 1e3, 2), ev.count, ev.key, str(ev.input_shapes)[:160]))
    return {"rows_by_gpu_ms": sorted(rows, reverse=True)[:40]}


def one_channel(args, out) -> dict:
    """benchmarks/one_channel.py: the one-channel layers in other formulations, batch 1024, then aigc's whole
    eager step with train.subpixel_convs off and on."""
    return run_cmd([sys.executable, "benchmarks/one_channel.py", "--device", DEVICE, "--whole-step", "4",
                    "--batch", "1024" if DEVICE == "cuda" else "64", "--json", str(out / "one_channel.json")], timeout=200)


# name -> fn(args, out); parts that record several results call part() themselves
PARTS: dict = {
    "equivalence": lambda args, out: part(out, "graph_equivalence", graph_equivalence, args.data),
    "train": train_speeds,
    # fused BatchNorm + activation at the launch-bound batch sizes (fusion covers 256 and 1024)
    "train_graphed": lambda args, out: train_speeds(args, out, None, graphs=("auto",)),  # the defaults, graphed only
    "train_fuse": lambda args, out: train_speeds(args, out, "on", (64, 128), ("auto",)),
    # one graphed, fused run at batch 1024 (cudnn_search runs it in subprocesses)
    "b1024": lambda args, out: part(out, "b1024", aigc_train_speed, args.data, 1024, "auto", 150),
    **{name: (lambda fn, name: lambda args, out: part(out, name, fn, args, out))(fn, name) for name, fn in [
        ("fusion", fusion_speed), ("profile", kernel_profile), ("rollback", rollback_under_graph),
        ("resume", resume_under_graph), ("eval", eval_speed), ("fid_agreement", fid_agreement),
        ("sample", sample_speed), ("vs_reference", vs_reference), ("copies", layout_copies),
        ("one_channel", one_channel), ("subpixel", subpixel_speed), ("adopt_best", adopt_best),
        ("cudnn_search", cudnn_search_speed), ("presets", presets_at_defaults), ("train_eager", eager_speed)]},
}

if __name__ == "__main__":
    main()
