"""`aigc export --out x.onnx`: the generator as an ONNX model that onnxruntime runs to the same images as
aigc's own generator, at any batch size, with the export's metadata; the refusals around it."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import Silent, run_cli, tiny

from aigc_cli import checkpoint as ckpt_io
from aigc_cli.sampling import generator_from
from aigc_cli.training.loop import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for name, kind, model in (("dcgan", "dcgan", {}), ("cond-resnet", "resnet_gan", {"conditional": True}),
                              ("vae", "vae", {"likelihood": "bernoulli"})):
        train(tiny(kind, **model).with_overrides({"train.steps": 1}), root / name, Silent())
        out[name] = root / name
    return out


@pytest.mark.parametrize("name", ["dcgan", "cond-resnet", "vae"])
def test_onnxruntime_makes_the_generators_images(monkeypatch, capsys, runs, tmp_path, name):
    path = tmp_path / "g.onnx"
    code, out, err = run_cli(monkeypatch, capsys, "export", runs[name], "--out", path, "--json")
    assert code == 0, err
    info = json.loads(out)  # the exporter's own progress lines stay off stdout
    ck = ckpt_io.load(runs[name])
    m = ck.config.model
    assert info["format"] == "onnx" and info["inputs"] == (["z", "labels"] if m.conditional else ["z"])
    assert info["bytes"] == path.stat().st_size
    G, amp = generator_from(ck, "cpu", "fp32")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # the batch size is free
        z = torch.randn(batch, m.latent_dim, generator=torch.Generator().manual_seed(batch))
        feed = {"z": z.numpy()}
        labels = None
        if m.conditional:
            labels = torch.arange(batch) % m.num_classes
            feed["labels"] = labels.numpy()
        (images,) = session.run(["images"], feed)
        with torch.inference_mode():
            expected = G(z, labels).float().numpy()
        assert images.shape == (batch, m.channels, m.resolution, m.resolution)
        np.testing.assert_allclose(images, expected, atol=1e-4)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version <= 8 and proto.producer_name == "aigc"  # loads in onnxruntime 1.14+
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["aigc.kind"] == "export" and props["aigc.model"] == m.kind
    assert json.loads(props["aigc.config"]) == json.loads(ck.config.to_json())
    assert props["aigc.source"] == str(ck.step_file) and props["aigc.step"] == "1"


def test_onnx_refusals_and_readers_say_what_to_do(monkeypatch, capsys, runs, tmp_path):
    path = tmp_path / "g.onnx"
    code, _, err = run_cli(monkeypatch, capsys, "export", runs["dcgan"], "--out", path, "--dtype", "fp16")
    assert code == 2 and "ONNX exports are fp32" in err and not path.exists(), err
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # not installed
    code, _, err = run_cli(monkeypatch, capsys, "export", runs["dcgan"], "--out", path)
    assert code == 2 and "needs the onnx and onnxscript packages" in err and "aigc[onnx]" in err, err
    assert not path.exists()
    other = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]), producer_name="pytorch")
    onnx.save(other, str(tmp_path / "other.onnx"))
    before = (tmp_path / "other.onnx").read_bytes()
    monkeypatch.delitem(sys.modules, "onnxscript", raising=False)
    code, _, err = run_cli(monkeypatch, capsys, "export", runs["dcgan"], "--out", tmp_path / "other.onnx")
    assert code == 2 and "holds an ONNX model that aigc did not write (pytorch)" in err, err
    assert (tmp_path / "other.onnx").read_bytes() == before
    for _ in range(2):  # an earlier export of aigc's is replaced
        code, _, err = run_cli(monkeypatch, capsys, "export", runs["dcgan"], "--out", tmp_path / "ours.onnx")
        assert code == 0, err
    path.write_bytes(b"\x08\x07" + b"\0" * 100)  # what sample or info would be handed by mistake
    for command in ("info", "sample"):
        code, _, err = run_cli(monkeypatch, capsys, command, path)
        assert code == 2 and "an ONNX model, for runtimes such as onnxruntime" in err, err
    code, _, err = run_cli(monkeypatch, capsys, "export", runs["dcgan"], "--out", tmp_path / "g.pt")
    assert code == 2 and "use a name ending in .safetensors or .onnx" in err, err
    code, _, err = run_cli(monkeypatch, capsys, "export", runs["dcgan"], "--out", path / "x.onnx")  # g.onnx: a file
    assert code == 2 and err.startswith(f"error: --out {path / 'x.onnx'}: ") and "is a file, not a folder" in err, err
