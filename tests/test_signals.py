"""Signals on a real training process: SIGTERM/SIGINT finish the step, save and exit 143/130; the saved
checkpoint resumes to exactly what an uninterrupted run gives; SIGUSR1 saves and goes on (or exits 75
with --exit-on-usr1); a second SIGINT stops at once without damaging what is on disk."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aigc_cli import checkpoint as ckpt_io
from conftest import aigc_command, default_sighup

TINY = ["--preset", "quickstart", "--set", "train.log_every=1", "--set", "data.limit=256", "--set", "model.g_width=8",
        "--set", "model.d_width=8", "--set", "train.n_samples=4", "--set", "train.sample_every=100000",
        "--set", "train.ckpt_every=100000"]


def start(aigc_env, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(aigc_command() + ["train", *TINY, "--out", str(out), *extra], env=aigc_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sighup)


def wait_for_steps(proc: subprocess.Popen, out: Path, n: int) -> None:
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < n):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_signal_saves_and_the_resume_matches_an_uninterrupted_run(aigc, aigc_env, tmp_path, sig, code):
    out = tmp_path / "run"
    proc = start(aigc_env, out, "--steps", "100000", *(["--json"] if sig == signal.SIGINT else []))
    wait_for_steps(proc, out, 3)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and "saved" in stderr and "--resume auto" in stderr
    assert f"stopped: {signal.Signals(sig).name} at step" in stderr and "error:" not in stderr  # not a failure
    saved = sorted((out / "checkpoints").glob("step-*.safetensors"))
    assert len(saved) == 1 and (out / "checkpoints" / "last.safetensors").is_file()
    k = ckpt_io.load(saved[0]).step
    assert 3 <= k < 100000
    if sig == signal.SIGINT:  # with --json: the object for the stop that saved, as scripts read it
        summary = json.loads(stdout)
        assert (summary["stopped"], summary["exit_code"], summary["steps"]) == ("SIGINT", 130, k)
        assert summary["checkpoint"] == str(saved[0]) and "samples" not in summary  # no grid at that step
    if sig != signal.SIGTERM:  # a closed terminal (SIGHUP) killed the run on the spot, nothing saved
        return  # the resume below is the same for every signal; once is enough for the suite's time

    n = k + 4
    r = aigc("train", *TINY, "--out", out, "--steps", n, "--resume", "auto")
    assert r.code == 0, r.stderr
    assert f"done: 4 steps (step {k} to {n}) in " in r.stdout  # the steps this run made, not the target
    r = aigc("train", *TINY, "--out", tmp_path / "whole", "--steps", n, "--json")
    assert r.code == 0, r.stderr
    a, b = ckpt_io.load(out), ckpt_io.load(tmp_path / "whole")
    weights = [key for key in a.tensors if key[0] in "GD" and "." in key]
    assert weights and all((a.tensors[key] == b.tensors[key]).all() for key in weights)
    png = f"samples/step-{n:07d}.png"
    assert (out / png).read_bytes() == (tmp_path / "whole" / png).read_bytes()


def test_usr1_saves_and_continues_then_exit_on_usr1_exits_75(aigc_env, tmp_path):
    out = tmp_path / "run"
    proc = start(aigc_env, out, "--steps", "100000")
    wait_for_steps(proc, out, 2)
    proc.send_signal(signal.SIGUSR1)
    deadline = time.time() + 60
    while time.time() < deadline and not list((out / "checkpoints").glob("step-*.safetensors")):
        time.sleep(0.1)
    first = ckpt_io.load(out).step
    wait_for_steps(proc, out, first + 3)  # still training after the save
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "SIGUSR1: saved" in stderr

    proc = start(aigc_env, out, "--steps", "100000", "--resume", "auto", "--exit-on-usr1", "--json")
    wait_for_steps(proc, out, ckpt_io.load(out).step + 2)
    proc.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr
    assert (json.loads(stdout)["stopped"], json.loads(stdout)["steps"]) == ("SIGUSR1", ckpt_io.load(out).step)
    assert "stopped: SIGUSR1 at step" in stderr and "note: SIGUSR1" not in stderr  # one line, not two
    assert ckpt_io.load(out).step > first


def test_second_sigint_exits_at_once_and_leaves_valid_files(aigc_env, tmp_path):
    out = tmp_path / "run"
    proc = start(aigc_env, out, "--steps", "100000", "--set", "train.ckpt_every=2")
    wait_for_steps(proc, out, 4)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    files = list((out / "checkpoints").iterdir())
    assert files and not [f for f in files if f.name.endswith(".tmp")]
    for f in files:
        ckpt_io.load(f)  # every file left there is a whole, valid checkpoint


def test_divergence_exit_code_3_from_the_real_command(aigc_env, tmp_path):
    """The real CLI with a fault injected into the GAN step (NaN loss from step 3 on)."""
    inject = (
        "import sys; from aigc_cli.training import steps; real = steps.STEPS['gan']\n"
        "def poisoned(*a):\n"
        "    out = real(*a); poisoned.n = getattr(poisoned, 'n', 0) + 1\n"
        "    return {**out, 'loss_g': out['loss_g'] * float('nan')} if poisoned.n >= 3 else out\n"
        "steps.STEPS['gan'] = poisoned\n"
        "from aigc_cli.cli import main; sys.argv[0] = 'aigc'; main()\n"
    )
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", inject, "train", *TINY, "--out", str(out), "--steps", "20",
                           "--set", "train.ckpt_every=2", "--set", "train.max_recoveries=2"],
                          env=aigc_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr
    lines = [s for s in proc.stderr.splitlines() if s.startswith("error:")]
    assert len(lines) == 1 and "diverged" in lines[0] and "step-0000002.safetensors" in lines[0]
    assert proc.stderr.count("rolled back to step 2") == 2


def test_sigusr1_before_training_has_begun_is_harmless(aigc_env):
    """SIGUSR1 ("save now") while the command is still importing killed it with exit 138 (no requeue)."""
    hook = ("import builtins, os, signal, sys\n"
            "real = builtins.__import__\n"
            "def hooked(name, *a, **k):\n"
            "    if name == 'typer' and name not in sys.modules:\n"
            "        os.kill(os.getpid(), signal.SIGUSR1)\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = hooked\n"
            "sys.argv = ['aigc', 'presets', 'show', 'quickstart']\n"
            "from aigc_cli import main\n"
            "main()\n")
    proc = subprocess.run([sys.executable, "-c", hook], env=aigc_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and 'name = "quickstart"' in proc.stdout, (proc.returncode, proc.stderr)


@pytest.mark.parametrize("module", ["typer", "rich.console"])
def test_ctrl_c_while_the_cli_is_still_importing_is_one_line_and_exit_130(aigc_env, module):
    """The signal is raised the moment `module` is first imported, which the `aigc` script does before
    any command runs: a stop, not a KeyboardInterrupt traceback."""
    hook = ("import builtins, os, signal, sys\n"
            "real = builtins.__import__\n"
            "def hooked(name, *a, **k):\n"
            f"    if name == {module!r} and name not in sys.modules:\n"
            "        os.kill(os.getpid(), signal.SIGINT)\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = hooked\n"
            "sys.argv = ['aigc', 'presets', 'list']\n"
            "from aigc_cli import main\n"
            "main()\n")
    proc = subprocess.run([sys.executable, "-c", hook], env=aigc_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == "stopped: SIGINT (Ctrl-C)\n"
    assert proc.stdout == ""


def test_sigterm_to_the_process_group_saves_a_run_on_streamed_data(aigc_env, tmp_path):
    """`timeout` and SLURM signal the whole group: the DataLoader workers used to die first, and the run
    ended in a traceback, exit 1, nothing saved."""
    import os

    import numpy as np
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(64):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    out = tmp_path / "run"
    proc = subprocess.Popen(aigc_command() + ["train", *TINY, "--data", str(folder), "--set", "data.device_max_mb=0",
                                              "--set", "data.workers=1", "--set", "data.cache=false",
                                              "--steps", "100000", "--out", str(out)],
                            env=aigc_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for_steps(proc, out, 3)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "stopped: SIGTERM at step" in err and "Traceback" not in err, err
    assert ckpt_io.load(out).step >= 3


def test_a_stop_while_an_image_folder_decodes_ends_the_decode_at_once(tmp_path, monkeypatch, capsys):
    """Decoding a large folder takes minutes; a SIGTERM then (a job cancelled early) used to wait for all of
    it before `nothing to save`. Now it stops there, and leaves no cache entry or run folder behind."""
    import os

    from aigc_cli.data import folder
    from conftest import run_cli, write_image_folder

    images = write_image_folder(tmp_path / "images", n_per_class=200, size=16)
    decoded = []
    real_decode = folder._try_decode

    def decode(*args):
        decoded.append(args[1])
        if len(decoded) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_decode(*args)

    monkeypatch.setattr(folder, "_try_decode", decode)
    code, _, err = run_cli(monkeypatch, capsys, "train", "--preset", "quickstart", "--data", images,
                           "--out", tmp_path / "run", "--steps", "2")
    assert (code, err) == (143, "stopped: SIGTERM while loading the data, before the first step; nothing to save\n")
    assert len(decoded) < 100 and not (tmp_path / "run").exists()  # not the other 395 images
    cache = Path(os.environ["AIGC_CACHE_DIR"])
    assert not [p for p in cache.rglob("*") if p.is_file() and "index" not in p.parts], list(cache.rglob("*"))


def test_a_stop_does_not_cut_a_dataset_download_short(tmp_path, monkeypatch):
    """torchvision writes and unpacks a download under the final file names: cut short, they would look like
    data to the next run. The stop waits for the download (and then ends the run before its first step)."""
    import os

    from aigc_cli.data import torchvision_sources
    from aigc_cli.errors import UsageError
    from aigc_cli.training.loop import train
    from conftest import Silent, tiny

    finished = []

    def download(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.3)  # still "downloading" when the signal lands
        finished.append(True)
        raise UsageError("the download ended")  # what happens next does not matter here

    monkeypatch.setattr(torchvision_sources, "find_mnist_like", download)
    (tmp_path / "root").mkdir()
    cfg = tiny("dcgan").with_overrides({"data.source": "mnist", "data.root": str(tmp_path / "root"),
                                        "data.download": "true"})
    with pytest.raises(UsageError, match="the download ended"):  # not Interrupted from inside the download
        train(cfg, tmp_path / "run", Silent())
    assert finished


def test_a_stop_inside_an_import_during_the_data_load_waits_for_the_import(tmp_path, monkeypatch):
    """Raised inside an import, the stop could be swallowed by the C code that called it or leave importlib's
    locks held; it is raised once the import is done, still during the load."""
    from aigc_cli.errors import Interrupted
    from aigc_cli.training import loop
    from conftest import Silent, module_that_stops_its_import, tiny

    module_that_stops_its_import(tmp_path, monkeypatch, "decoder_plugin")
    decoded = []

    def load_data(*args, **kwargs):
        import decoder_plugin  # noqa: F401 - a plugin loaded on first use, as PIL's are

        for i in range(100):  # the decode goes on; the stop must land here
            decoded.append(i)
            time.sleep(0.05)
        raise AssertionError("the stop was lost")

    monkeypatch.setattr(loop, "load_data", load_data)
    with pytest.raises(Interrupted, match="SIGTERM while loading the data"):
        loop.train(tiny("dcgan"), tmp_path / "run", Silent())
    assert 0 < len(decoded) < 20 and signal.getsignal(signal.SIGALRM) is signal.SIG_DFL


def test_the_first_stop_names_the_exit_code():
    """SIGTERM (a batch system's time limit: requeued on 143) then a SIGINT in the same step ended 130,
    which the README's SLURM script does not requeue."""
    import os

    from aigc_cli.training.signals import StopFlag

    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        assert (stop.name, stop.exit_code) == ("SIGTERM", 143)


def test_sigusr1_during_set_up_is_ignored_as_the_readme_says(tmp_path):
    """It was remembered: the first step then saved, and --exit-on-usr1 exited 75 after one step."""
    import os

    from aigc_cli.training.loop import train
    from conftest import Silent, tiny

    class UsrAtStart(Silent):
        def start(self, total_steps, info):
            super().start(total_steps, info)
            os.kill(os.getpid(), signal.SIGUSR1)  # the data has loaded; no step has run

    rep = UsrAtStart()
    summary = train(tiny("dcgan").with_overrides({"train.steps": "3", "train.ckpt_every": "3"}), tmp_path / "r", rep,
                    exit_on_usr1=True)
    assert summary["steps"] == 3 and "SIGUSR1 came before the first step: nothing to save, ignored" in rep.notes
    assert [p.name for p in (tmp_path / "r" / "checkpoints").glob("step-*")] == ["step-0000003.safetensors"]


@pytest.mark.parametrize("tail, ends", [("", "with the command"), ("raise ImportError('half a module')\n", "in an error")])
def test_a_stop_that_landed_in_an_import_is_raised_when_the_command_ends_before_the_retry(tmp_path, monkeypatch, tail,
                                                                                          ends):
    """The stop waits for the import (see signals.in_import); a command that ends, or fails, before the retry
    (RETRY_S) would otherwise exit 0 or with the import's error: the SIGTERM lost."""
    from aigc_cli.cli.output import sigterm_raises
    from aigc_cli.errors import Terminated
    from conftest import module_that_stops_its_import

    module_that_stops_its_import(tmp_path, monkeypatch, f"stops_then_ends_{len(tail)}", tail)
    with pytest.raises(Terminated) as stopped, sigterm_raises():
        __import__(f"stops_then_ends_{len(tail)}")
    assert stopped.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

