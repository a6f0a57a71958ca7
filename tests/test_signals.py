"""SIGTERM and SIGINT on a real training process: it finishes the step, saves, and exits 143 / 130."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import aigc_command


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_a_checkpoint_and_exits(aigc, aigc_env, tmp_path, sig, code):
    out = tmp_path / "run"
    proc = subprocess.Popen(aigc_command() + ["train", "--preset", "quickstart", "--out", str(out), "--steps", "100000",
                                              "--set", "train.log_every=1", "--set", "data.limit=256",
                                              "--set", "model.g_width=8", "--set", "model.d_width=8"],
                            env=aigc_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and "saved" in stderr
    saved = sorted((out / "checkpoints").glob("step-*.safetensors"))
    assert len(saved) == 1 and (out / "checkpoints" / "last.safetensors").is_file()
    step = int(saved[0].stem.split("-")[1])
    assert 3 <= step < 100000
    info = aigc("info", out, "--json")
    assert info.code == 0 and info.json()["step"] == step
