"""The README's SLURM script and Makefile, run as written: bash and make for real, `aigc` a wrapper that
keeps each command small (a tiny preset on the built-in data), `scontrol` a stub that records its call."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aigc_cli import checkpoint as ckpt_io
from conftest import aigc_command

README = Path(__file__).resolve().parent.parent / "README.md"

# Real presets and data are too slow here: the same commands on a tiny quickstart / shapes classifier.
WRAPPER = '''#!{python}
import os, sys
args = sys.argv[1:]
if args[:1] == ["train"]:
    if "--epochs" in args:
        i = args.index("--epochs"); del args[i:i + 2]
    i = args.index("--preset")
    args[i + 1] = {{"fashion-mnist-dcgan": "quickstart", "fashion-mnist-classifier": "shapes-classifier"}}[args[i + 1]]
    args += ["--steps", os.environ["TEST_STEPS"], "--batch-size", "8", "--set", "model.g_width=8",
             "--set", "model.d_width=8", "--set", "model.resolution=16", "--set", "train.log_every=1",
             "--set", "train.sample_every=100000", "--set", "train.ckpt_every=100000", "--set", "data.limit=256"]
if args[:1] == ["eval"]:
    args += ["--n", "40", "--batch-size", "40"]
os.execv({aigc!r}, [{aigc!r}, *args]) if {direct} else os.execv(sys.executable, [sys.executable, "-m", "aigc_cli", *args])
'''


def block(lang: str, marker: str) -> str:
    for body in re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S):
        if marker in body:
            return body
    raise AssertionError(f"no ```{lang} block with {marker!r} in the README")


@pytest.fixture
def tools(tmp_path, aigc_env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cmd = aigc_command()
    (bin_dir / "aigc").write_text(WRAPPER.format(python=sys.executable, aigc=cmd[0], direct=len(cmd) == 1))
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**aigc_env, "PATH": f"{bin_dir}{os.pathsep}{aigc_env['PATH']}", "SLURM_JOB_ID": "4242"}
    return tmp_path, env


def wait_for_training(run: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until the run has logged a step (its signal handlers are set by then)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().strip():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError("training did not start")


@pytest.mark.parametrize("sig, code", [(signal.SIGUSR1, 75), (signal.SIGTERM, 143)])
def test_the_slurm_script_saves_and_requeues(tools, sig, code):
    """USR1 (ahead of the time limit) and TERM (the limit, a preemption) to the batch shell alone: aigc
    saves, and the shell lives on to requeue the job. Before the TERM trap, bash died at once."""
    tmp, env = tools
    script = tmp / "job.sh"
    script.write_text(block("sh", "#SBATCH"))
    proc = subprocess.Popen(["bash", str(script)], cwd=tmp, env={**env, "TEST_STEPS": "100000"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_training(tmp / "runs" / "fm", proc)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert (tmp / "scontrol.log").read_text() == "requeue 4242\n"
    saved = ckpt_io.load(tmp / "runs" / "fm")
    assert 0 < saved.step < 100000


def test_the_makefile_resumes_an_interrupted_run_and_builds_everything(tools):
    tmp, env = tools
    (tmp / "Makefile").write_text(block("make", "fid.json"))
    proc = subprocess.Popen(["make"], cwd=tmp, env={**env, "TEST_STEPS": "100000"}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_training(tmp / "runs" / "fm", proc)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal: make and aigc alike
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and "stopped: SIGINT at step" in err, err
    stopped_at = ckpt_io.load(tmp / "runs" / "fm").step
    assert not (tmp / "runs" / "fm" / "done").exists()

    steps = stopped_at + 3
    r = subprocess.run(["make"], cwd=tmp, env={**env, "TEST_STEPS": str(steps)}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert ckpt_io.load(tmp / "runs" / "fm").step == steps  # finished, not taken as done at the interruption
    assert (tmp / "runs" / "fm" / "done").exists() and (tmp / "runs" / "clf" / "done").exists()
    assert "fid" in json.loads((tmp / "fid.json").read_text())["metrics"]
    assert ckpt_io.load(tmp / "model.safetensors").kind == "export"
    again = subprocess.run(["make"], cwd=tmp, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout
