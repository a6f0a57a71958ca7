"""The .safetensors files aigc writes (streamed from the tensors, to the path given) and the cache entries
it reads whole into memory.

safetensors' own save_file (0.8) writes a temporary file of its own (`.tmpXXXXXX`, in the target's folder)
and renames it over the target: a process killed meanwhile (SIGKILL after a batch system's grace period)
leaves that file, checkpoint-sized, where no sweep of aigc's temporary names finds it. Its `save` returns
the whole file as bytes instead, a second copy of every tensor in memory. The format is simple and fixed
(https://github.com/huggingface/safetensors#format), and safe_open reads what this writes (tests check it).
"""

from __future__ import annotations

import json
import os
import struct

import torch

# In the order of safetensors' Dtype enum, which orders the file's tensors (last first, then by name); each
# one's size is a multiple of the next's, so every tensor starts at a multiple of its element size.
DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
          torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64",
          torch.int64: "I64"}
RANK = {dtype: k for k, dtype in enumerate(DTYPES)}


def write(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (any device, layout or sharing; copied to the CPU one at a time) and the string
    `metadata` to `path`: the bytes safetensors' save_file writes (the header padded to 8 bytes)."""
    for name, t in tensors.items():  # what save_file refused too: else a file that nothing reads
        if t.dtype not in DTYPES or name == "__metadata__":
            raise TypeError(f"{name}: a tensor of dtype {t.dtype} under this name is not written by aigc")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in (metadata or {}).items()):
        raise TypeError("safetensors metadata maps text to text")
    names = sorted(tensors, key=lambda k: (-RANK[tensors[k].dtype], k))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in names:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in names:
            t = tensors[name].detach().to("cpu")
            if t.numel():  # reshape: a contiguous copy of a view, else the tensor itself
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)


NAMED = {name: dtype for dtype, name in DTYPES.items()}


def read_whole(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, read whole into memory.

    safetensors' own loader maps the file into memory; a file replaced or truncated by another process
    meanwhile (a shared cache entry) would then kill this one with SIGBUS. One read() into a buffer
    that the tensors then share costs no more than the copy out of a mapping would.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buf = bytearray(size)
        if f.readinto(buf) != size:
            raise ValueError("the file changed while it was read")
    n = int.from_bytes(buf[:8], "little") if size >= 8 else -1
    if not 0 < n <= size - 8:
        raise ValueError("truncated or not a safetensors file")
    header = json.loads(bytes(buf[8:8 + n]))
    meta = header.pop("__metadata__", None) or {}
    base, tensors = 8 + n, {}
    for name, spec in header.items():
        dtype = NAMED[spec["dtype"]]
        start, end = (int(v) for v in spec["data_offsets"])
        shape = [int(d) for d in spec["shape"]]
        count = 1
        for d in shape:
            count *= d
        if not 0 <= start <= end <= size - base or end - start != count * dtype.itemsize or count == 0:
            raise ValueError(f"tensor {name!r} does not fit the file (truncated?)")
        if dtype == torch.uint8:  # a view of the buffer: no copy
            tensors[name] = torch.frombuffer(buf, dtype=dtype, count=count, offset=base + start).view(shape)
        else:  # a small, freshly allocated (so aligned) copy
            tensors[name] = torch.frombuffer(bytearray(buf[base + start:base + end]), dtype=dtype).view(shape)
    return tensors, meta
