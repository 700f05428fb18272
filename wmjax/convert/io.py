"""File-level helpers: lazy tensor sources (safetensors / torch .bin / in-memory), array conversion, atomic directory
writes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator, Mapping, Optional

import ml_dtypes
import numpy as np
from safetensors import safe_open

from wmjax.convert.layout import ConversionError

__all__ = ["TensorRef", "to_numpy", "open_safetensors", "open_torch_bin", "in_memory_tensors", "hf_weight_files",
           "atomic_directory", "check_destination", "read_json"]


class TensorRef:
    """A tensor known by shape before it is read (`load()` reads it as numpy, errors naming the file)."""

    __slots__ = ("shape", "file", "_load")

    def __init__(self, shape, file: Optional[str], load: Callable[[], np.ndarray]):
        self.shape = tuple(int(s) for s in shape)
        self.file = file
        self._load = load

    def load(self) -> np.ndarray:
        return self._load()


def to_numpy(x: Any) -> np.ndarray:
    """numpy view/copy of a numpy, jax or torch array, keeping the dtype (bf16 via ml_dtypes)."""
    if type(x).__module__.startswith("torch"):
        import torch

        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            return x.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()
    return np.asarray(x)


def read_json(file: str, what: str) -> Any:
    try:
        with open(file) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{file}: no {what} (file not found)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{file}: {what} is not valid JSON ({e})") from None
    except OSError as e:
        raise ConversionError(f"{file}: cannot read {what} ({e})") from None


def open_safetensors(file: str, stack: contextlib.ExitStack, keys: Optional[list[str]] = None
                     ) -> dict[str, TensorRef]:
    """Lazy refs to the tensors of one safetensors file (only `keys` if given). The header is parsed and checked
    against the file size now; a corrupt / truncated / unreadable file raises a ConversionError naming it."""
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"file is {size} bytes, too short for a safetensors header")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
        end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"] or [0])
        if 8 + n + end != size:
            raise ValueError(f"tensor data ends at byte {8 + n + end} but the file has {size} bytes (truncated?)")
        handle = stack.enter_context(safe_open(file, framework="np"))
        names = list(handle.keys())
    except ConversionError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure here means the file is unusable
        raise ConversionError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    if keys is not None:
        absent = [k for k in keys if k not in names]
        if absent:
            raise ConversionError(f"{file}: the index lists tensor(s) this shard does not contain: {absent}")
        names = keys

    def loader(k):
        def load():
            try:
                return handle.get_tensor(k)
            except Exception as e:  # noqa: BLE001
                raise ConversionError(f"{file}: cannot read tensor {k!r} ({type(e).__name__}: {e})") from None
        return load

    return {k: TensorRef(header[k]["shape"], file, loader(k)) for k in names}


def open_torch_bin(file: str) -> dict[str, TensorRef]:
    try:
        import torch
    except ImportError:
        raise ConversionError(f"{file}: reading a PyTorch .bin checkpoint needs torch installed") from None
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ConversionError(f"{file}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(sd, Mapping):
        raise ConversionError(f"{file}: expected a state dict, found {type(sd).__name__}")
    return {k: TensorRef(v.shape, file, (lambda v=v: to_numpy(v))) for k, v in sd.items()}


def in_memory_tensors(sd: Mapping[str, Any]) -> dict[str, TensorRef]:
    out = {}
    for k, v in sd.items():
        if not hasattr(v, "shape"):
            v = np.asarray(v)
        out[k] = TensorRef(v.shape, None, (lambda v=v: to_numpy(v)))
    return out


def hf_weight_files(path: str) -> tuple[str, list[tuple[str, Optional[list[str]]]]]:
    """('safetensors' | 'bin', [(file, keys or None), ...]) for a HF model directory (sharded index files first)."""
    for kind, index, single in (("safetensors", "model.safetensors.index.json", "model.safetensors"),
                                ("bin", "pytorch_model.bin.index.json", "pytorch_model.bin")):
        ifile = os.path.join(path, index)
        if os.path.exists(ifile):
            idx = read_json(ifile, "sharded checkpoint index")
            wmap = idx.get("weight_map") if isinstance(idx, dict) else None
            if not isinstance(wmap, dict):
                raise ConversionError(f"{ifile}: no 'weight_map' object")
            shards: dict[str, list[str]] = {}
            for k, f in wmap.items():
                shards.setdefault(f, []).append(k)
            missing = [f for f in shards if not os.path.exists(os.path.join(path, f))]
            if missing:
                raise ConversionError(f"{ifile}: shard file(s) not found: {missing}")
            return kind, [(os.path.join(path, f), ks) for f, ks in shards.items()]
        sfile = os.path.join(path, single)
        if os.path.exists(sfile):
            return kind, [(sfile, None)]
    raise ConversionError(f"{path}: no model.safetensors, pytorch_model.bin or sharded index file found")


def check_destination(dest: str, overwrite: bool = False, sources=()) -> str:
    """abspath of `dest` if a checkpoint can be written there, else a one-line ConversionError: `dest` is one of
    `sources` or holds one, is not a directory, is not empty (unless overwrite), or its parent cannot be written."""
    dest = os.path.abspath(dest)
    for src in sources:
        src = os.path.realpath(os.fspath(src))
        real = os.path.realpath(dest)
        if src == real or os.path.commonpath([src, real]) == real:
            raise ConversionError(f"{dest}: is {'the' if src == real else 'a folder holding the'} source "
                                  f"{src}; write the converted checkpoint elsewhere")
    if os.path.lexists(dest):
        if not os.path.isdir(dest) or os.path.islink(dest):
            raise ConversionError(f"{dest}: exists and is not a directory; refusing to replace it")
        if os.listdir(dest) and not overwrite:
            raise ConversionError(f"{dest}: exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    parent = os.path.dirname(dest)
    while not os.path.lexists(parent):  # the first existing ancestor is where the folders get created
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConversionError(f"{dest}: cannot be created: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConversionError(f"{dest}: cannot be written: no write permission in {parent}")
    return dest


@contextlib.contextmanager
def atomic_directory(dest: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a fresh temp dir next to `dest`; on success it replaces `dest`, on any failure it is removed and `dest`
    is left exactly as it was. `dest` is checked first (`check_destination`). The files written get mode 0644 and
    the directory 0755 (less the umask)."""
    dest = check_destination(dest, overwrite)
    parent, name = os.path.split(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        yield tmp
        for f in os.listdir(tmp):  # make the written bytes durable before the rename publishes them
            fd = os.open(os.path.join(tmp, f), os.O_RDONLY)
            try:
                os.fchmod(fd, 0o644 & ~_umask())  # temp files (safetensors) are created 0600
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(tmp, 0o755 & ~_umask())
        if os.path.lexists(dest):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rename(dest, os.path.join(old, name))
            try:
                os.rename(tmp, dest)
            except BaseException:
                os.rename(os.path.join(old, name), dest)
                shutil.rmtree(old, ignore_errors=True)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m
