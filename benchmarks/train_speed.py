"""Training-speed benchmark: `aigc`'s real training loop against the pytorch/examples DCGAN loop.

Both sides train the same 64x64 DCGAN (nz 100, ngf = ndf = 64, one channel) on the same Fashion-MNIST
files, at the same batch sizes, on the same device, for the same number of steps; the runs alternate
(reference, aigc, reference, aigc, ...) and the median of the repeats is reported per side. Not part
of `make test`. Example (the CPU table in benchmarks/README.md):

    python benchmarks/train_speed.py --device cpu --batch-sizes 64

The reference is a copy of pytorch/examples `dcgan/main.py` (the Generator/Discriminator with BatchNorm,
weights_init N(0, 0.02), Sigmoid + nn.BCELoss, Adam 2e-4 (0.5, 0.999), its step order and its `.item()`
calls, `cudnn.benchmark = True`, torchvision's FashionMNIST with Resize(64) + ToTensor + Normalize(0.5, 0.5)
through a DataLoader(shuffle=True, num_workers=--workers), `.to(device)` per batch, fp32, no AMP). What it
leaves out, like aigc's side here: the per-step print (the string is still formatted), the sample PNGs every
100 iterations and the per-epoch checkpoints. aigc's side is `aigc_cli.training.loop.train` itself with
the `fashion-mnist-dcgan` preset (EMA of G included, as that preset trains), samples and checkpoints
only at the end, outside the measured intervals.

images/s: both sides time the same intervals of --interval steps (aigc's own metrics records, whose
`img_per_s` ends each interval with a device sync; the reference syncs every step through `.item()`).
The first --warmup steps are left out; the median interval is reported. "wall s" is the whole side from
before data loading to the end of training (aigc: including its end-of-run grid and checkpoint).

Each side runs in a fresh subprocess of this script, so each gets its own peak-memory counters
(torch.cuda.max_memory_allocated on CUDA; on the CPU the process's RSS high-water mark from
resource.getrusage, which is what psutil would give too: DataLoader workers are counted apart) and
neither inherits the other's thread pools, allocator caches or forked loader workers.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# ---- data -----------------------------------------------------------------------------------

def prepare_raw(src: Path, root: Path) -> Path:
    """root/FashionMNIST/raw/ with the four unzipped IDX files, as torchvision's FashionMNIST expects
    (it cannot download here). aigc reads the same folder (it prefers the unzipped files)."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in IDX_FILES:
        out = raw / name
        if out.exists():
            continue
        if (src / name).exists():
            shutil.copyfile(src / name, out)
        elif (src / f"{name}.gz").exists():
            with gzip.open(src / f"{name}.gz", "rb") as f_in, open(out, "wb") as f_out:
                shutil.copyfileobj(f_in, f_out)
        else:
            sys.exit(f"{src}: no {name}[.gz]; install Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    return raw


# ---- measuring helpers (run inside a side's subprocess) -------------------------------------

def peak_memory(device) -> dict:
    import torch

    if device.type == "cuda":
        return {"peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
                "peak_kind": "torch.cuda.max_memory_allocated"}
    # Linux reports ru_maxrss in KiB. Not RUSAGE_CHILDREN: `import torch` itself runs a short-lived child.
    return {"peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_kind": "max RSS of the training process (getrusage; DataLoader workers not included)"}


def children_hwm_mb() -> float:
    """The largest RSS high-water mark among this process's live children (the DataLoader workers), from
    /proc; 0 where there is no /proc. Forked workers share most pages with the parent, so this is not
    additive with the parent's peak."""
    best = 0.0
    try:
        pids = {int(x) for task in Path("/proc/self/task").iterdir()
                for x in (task / "children").read_text().split()}
        for pid in pids:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    best = max(best, int(line.split()[1]) / 1024)
    except OSError:
        pass
    return round(best, 1)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- the reference: pytorch/examples dcgan/main.py ------------------------------------------

def run_reference(a) -> dict:
    t0 = time.perf_counter()
    import torch
    import torch.backends.cudnn as cudnn
    import torch.nn as nn
    import torch.optim as optim
    import torch.utils.data
    import torchvision.datasets as dset
    import torchvision.transforms as transforms

    from aigc_cli.training.precision import resolve_device

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    cudnn.benchmark = True
    device = resolve_device(a.device)
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
        torch.cuda.reset_peak_memory_stats()

    dataset = dset.FashionMNIST(root=a.root, train=True, download=False,
                                transform=transforms.Compose([
                                    transforms.Resize(64),
                                    transforms.ToTensor(),
                                    transforms.Normalize((0.5,), (0.5,)),
                                ]))
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=a.batch, shuffle=True, num_workers=a.workers)
    nz, ngf, ndf, nc = 100, 64, 64, 1

    def weights_init(m):
        classname = m.__class__.__name__
        if classname.find('Conv') != -1:
            torch.nn.init.normal_(m.weight, 0.0, 0.02)
        elif classname.find('BatchNorm') != -1:
            torch.nn.init.normal_(m.weight, 1.0, 0.02)
            torch.nn.init.zeros_(m.bias)

    class Generator(nn.Module):
        def __init__(self):
            super().__init__()
            self.main = nn.Sequential(
                nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8), nn.ReLU(True),
                nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
                nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
                nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
                nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh(),
            )

        def forward(self, input):
            return self.main(input)

    class Discriminator(nn.Module):
        def __init__(self):
            super().__init__()
            self.main = nn.Sequential(
                nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 8), nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False), nn.Sigmoid(),
            )

        def forward(self, input):
            return self.main(input).view(-1, 1).squeeze(1)

    netG = Generator().to(device)
    netG.apply(weights_init)
    netD = Discriminator().to(device)
    netD.apply(weights_init)
    criterion = nn.BCELoss()
    real_label, fake_label = 1, 0
    optimizerD = optim.Adam(netD.parameters(), lr=2e-4, betas=(0.5, 0.999))
    optimizerG = optim.Adam(netG.parameters(), lr=2e-4, betas=(0.5, 0.999))
    setup_s = time.perf_counter() - t0

    total = a.warmup + a.steps
    intervals, step, epoch, workers_mb = [], 0, 0, 0.0
    t_prev = time.perf_counter()
    while step < total:
        for i, data in enumerate(dataloader, 0):
            # (1) Update D network: maximize log(D(x)) + log(1 - D(G(z)))
            netD.zero_grad()
            real_cpu = data[0].to(device)
            batch_size = real_cpu.size(0)
            label = torch.full((batch_size,), real_label, dtype=real_cpu.dtype, device=device)
            output = netD(real_cpu)
            errD_real = criterion(output, label)
            errD_real.backward()
            D_x = output.mean().item()

            noise = torch.randn(batch_size, nz, 1, 1, device=device)
            fake = netG(noise)
            label.fill_(fake_label)
            output = netD(fake.detach())
            errD_fake = criterion(output, label)
            errD_fake.backward()
            D_G_z1 = output.mean().item()
            errD = errD_real + errD_fake
            optimizerD.step()

            # (2) Update G network: maximize log(D(G(z)))
            netG.zero_grad()
            label.fill_(real_label)
            output = netD(fake)
            errG = criterion(output, label)
            errG.backward()
            D_G_z2 = output.mean().item()
            optimizerG.step()
            _ = ('[%d/%d][%d/%d] Loss_D: %.4f Loss_G: %.4f D(x): %.4f D(G(z)): %.4f / %.4f'
                 % (epoch, 25, i, len(dataloader), errD.item(), errG.item(), D_x, D_G_z1, D_G_z2))

            step += 1
            if step % a.interval == 0:
                sync(device)
                now = time.perf_counter()
                if step > a.warmup:
                    intervals.append(a.interval * batch_size / (now - t_prev))
                if device.type == "cpu" and a.workers:
                    workers_mb = max(workers_mb, children_hwm_mb())  # outside the timed interval
                t_prev = time.perf_counter()
            if step >= total:
                break
        epoch += 1
    return {"intervals": intervals, "setup_s": round(setup_s, 2), "wall_s": round(time.perf_counter() - t0, 2),
            "precision": "fp32", "device": str(device), "workers": a.workers, "worker_peak_mb": workers_mb,
            "cpu_s": round(time.process_time(), 1), **peak_memory(device)}


# ---- aigc: its real training function ---------------------------------------------------------

class Recorder:
    """A training reporter that keeps the metrics records and prints nothing."""

    def __init__(self):
        self.records, self.notes, self.info = [], [], {}

    def start(self, total_steps, info): self.info = info
    def advance(self, step): pass
    def log(self, record): self.records.append(record)
    def note(self, text): self.notes.append(text)
    def finish(self): pass


def run_aigc(a) -> dict:
    t0 = time.perf_counter()
    import torch

    from aigc_cli.config import load_preset, parse_assignments
    from aigc_cli.training.loop import train
    from aigc_cli.training.precision import resolve_device

    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    total = a.warmup + a.steps
    cfg = load_preset("fashion-mnist-dcgan").with_overrides({
        "data.source": a.raw, "train.epochs": 0, "train.steps": total, "train.batch_size": a.batch,
        "train.log_every": a.interval, "train.sample_every": total, "train.ckpt_every": total,
        "train.precision": a.precision, "train.device": a.device, "train.seed": a.seed,
        **parse_assignments(a.aigc_set)})
    rep = Recorder()
    with tempfile.TemporaryDirectory(prefix="aigc-speed-") as run_dir:
        summary = train(cfg, Path(run_dir), rep)
    wall = time.perf_counter() - t0
    intervals = [r["img_per_s"] for r in rep.records if r["step"] > a.warmup]
    first = rep.records[0] if rep.records else {}
    return {"intervals": intervals, "setup_s": round(wall - summary["seconds"], 2), "wall_s": round(wall, 2),
            "train_s": summary["seconds"], "first_interval_s": first.get("elapsed_s"),
            "precision": summary["precision"], "device": summary["device"], "notes": rep.notes,
            "cpu_s": round(time.process_time(), 1),
            **peak_memory(torch.device(summary["device"]))}


# ---- orchestration ----------------------------------------------------------------------------

def side(a, kind: str, batch: int, workers: int, precision: str) -> dict:
    """One run of one side in a fresh subprocess of this script."""
    cmd = [sys.executable, __file__, "--side", kind, "--batch", str(batch), "--workers", str(workers),
           "--precision", precision, "--raw", str(a.raw), "--root", str(a.root), "--device", a.device,
           "--steps", str(a.steps), "--warmup", str(a.warmup), "--interval", str(a.interval),
           "--seed", str(a.seed), "--threads", str(a.threads)]
    for item in a.aigc_set:
        cmd += ["--aigc-set", item]
    wait_for_quiet(a.quiet_load)
    load_before = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        sys.exit(f"{kind} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["img_per_s"] = round(statistics.median(out["intervals"]), 1)
    out["loadavg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # before, after
    return out


def wait_for_quiet(limit: float, max_wait_s: float = 600) -> None:
    """On a shared machine: wait (up to max_wait_s) until the 1-minute load average is below `limit`."""
    if limit <= 0:
        return
    t0 = time.time()
    while os.getloadavg()[0] >= limit and time.time() - t0 < max_wait_s:
        time.sleep(5)


def parse_workers(text: str, batch_sizes: list[int]) -> dict[int, int]:
    """`2` -> the reference at every batch size with 2 workers; `64:2,256:12` -> only at those."""
    if ":" not in text:
        return {b: int(text) for b in batch_sizes}
    pairs = dict(tuple(int(x) for x in item.split(":")) for item in text.split(",") if item.strip())
    return {b: pairs[b] for b in batch_sizes if b in pairs}


def med(runs: list[dict], key: str):
    vals = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(vals), 1) if vals else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (both sides)")
    p.add_argument("--batch-sizes", default="64", help="comma list, e.g. 64,128,256")
    p.add_argument("--steps", type=int, default=30, help="measured steps per run (after --warmup)")
    p.add_argument("--warmup", type=int, default=10, help="steps left out at the start of every run")
    p.add_argument("--interval", type=int, default=10, help="steps per timed interval (aigc's train.log_every)")
    p.add_argument("--repeats", type=int, default=2, help="runs per side and batch size, alternating")
    p.add_argument("--workers", default="2",
                   help="reference DataLoader workers (the example's default: 2); or BATCH:WORKERS pairs "
                        "(64:2,256:12) to run the reference only at those batch sizes")
    p.add_argument("--precision", default="fp32",
                   help="aigc's precision, or a comma list for one aigc column each (auto,fp32); "
                        "the reference is always fp32, as in the example")
    p.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"),
                   help="folder with the Fashion-MNIST IDX files (.gz or not)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads on both sides (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--aigc-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra aigc config override, e.g. train.channels_last=off (repeatable)")
    p.add_argument("--quiet-load", type=float, default=0.0,
                   help="before each run, wait (up to 10 minutes) until the 1-minute load average is below this "
                        "(for a shared machine; 0: do not wait)")
    p.add_argument("--json", type=Path, help="also write every run's numbers here")
    p.add_argument("--side", choices=("reference", "aigc"), help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--raw", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.interval < 1 or a.steps < a.interval or a.warmup < 0 or a.warmup % a.interval or a.steps % a.interval:
        p.error("--steps and --warmup must be multiples of --interval, and --steps at least one interval")
    if a.repeats < 1:
        p.error(f"--repeats must be at least 1, got {a.repeats}")
    try:
        batch_sizes = [int(b) for b in a.batch_sizes.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batch-sizes must be a comma list of integers, got {a.batch_sizes!r}")
    if not batch_sizes or min(batch_sizes) < 1:
        p.error(f"--batch-sizes must be positive, got {a.batch_sizes!r}")

    if a.side:  # inside a subprocess: one run of one side, one JSON line on stdout
        a.workers = int(a.workers)
        result = run_reference(a) if a.side == "reference" else run_aigc(a)
        print(json.dumps(result))
        return

    workers = parse_workers(a.workers, batch_sizes)
    precisions = [x.strip() for x in a.precision.split(",") if x.strip()]
    command = "python " + shlex.join(["benchmarks/train_speed.py", *sys.argv[1:]])
    t_all = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="train-speed-data-") as tmp:
        a.root = Path(tmp)
        a.raw = prepare_raw(a.data, a.root)
        for batch in batch_sizes:
            runs: dict[str, list[dict]] = {"reference": [], **{f"aigc {x}": [] for x in precisions}}
            for r in range(a.repeats):
                order = ([("reference", "fp32")] if batch in workers else []) + [("aigc", x) for x in precisions]
                for kind, prec in order:
                    out = side(a, kind, batch, workers.get(batch, 0), prec)
                    name = "reference" if kind == "reference" else f"aigc {prec}"
                    runs[name].append(out)
                    print(f"batch {batch:5d} run {r + 1}/{a.repeats} {name:12s} {out['img_per_s']:9.1f} img/s  "
                          f"wall {out['wall_s']:6.1f} s  peak {out['peak_mb']:8.1f} MB  ({out['precision']}, "
                          f"{out['device']}; load {out['loadavg_1min'][0]:.1f} -> {out['loadavg_1min'][1]:.1f})",
                          file=sys.stderr, flush=True)
            results.append({"batch": batch, "workers": workers.get(batch),
                            "runs": {k: v for k, v in runs.items() if v}})

    lines = table(results, precisions, a)
    text = "\n".join([f"Command: `{command}`", f"({time.perf_counter() - t_all:.0f} s in all)", "", *lines])
    print(text)
    if a.json:
        a.json.write_text(json.dumps({"command": command, "results": results}, indent=1) + "\n")


def table(results: list[dict], precisions: list[str], a) -> list[str]:
    head = ["batch", "ref workers", "reference img/s"]
    for x in precisions:
        head += [f"aigc {x} img/s", "ratio"]
    head += ["wall s ref", *[f"wall s aigc {x}" for x in precisions], "peak MB ref", *[f"peak MB aigc {x}" for x in precisions]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    kind = ""
    for res in results:
        runs = res["runs"]
        ref = med(runs.get("reference", []), "img_per_s")
        row = [str(res["batch"]), str(res["workers"]) if res["workers"] is not None else "-", fmt(ref)]
        for x in precisions:
            ours = med(runs[f"aigc {x}"], "img_per_s")
            row += [fmt(ours), f"{ours / ref:.2f}x" if ref and ours else "-"]
        row += [fmt(med(runs.get("reference", []), "wall_s")), *[fmt(med(runs[f"aigc {x}"], "wall_s")) for x in precisions]]
        row += [fmt(med(runs.get("reference", []), "peak_mb")), *[fmt(med(runs[f"aigc {x}"], "peak_mb")) for x in precisions]]
        lines.append("| " + " | ".join(row) + " |")
        kind = next(iter(runs.values()))[0]["peak_kind"]
    loads = [x for res in results for runs in res["runs"].values() for r in runs for x in r["loadavg_1min"]]
    lines += ["", f"img/s: median over {a.repeats} alternating runs of each run's median {a.interval}-step interval "
              f"({a.steps} measured steps after {a.warmup} warm-up steps). Peak memory: {kind}. "
              f"1-minute load average around the runs: {min(loads):.1f} to {max(loads):.1f} "
              f"({os.cpu_count()} CPUs; anything above what the runs use themselves is someone else's)."]
    return lines


def fmt(v) -> str:
    return "-" if v is None else (f"{v:.0f}" if v >= 100 else f"{v:.1f}")


if __name__ == "__main__":
    main()
