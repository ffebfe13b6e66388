"""safetensors through the `safetensors` package: lazy memory-mapped reads, checked, and writes.

    tensors = open_tensors("model.safetensors")      # name -> LazyTensor (nothing read yet)
    tensors["lm_head.weight"].shape, .dtype           # from the header
    np.asarray(tensors["x"]), tensors["x"][0:128, :]  # the whole tensor, or one device's slice
    tensors["x"].T[idx]                               # a transposed view, sliced without a copy of the rest
    save_file({"x": array}, "out.safetensors", {"format": "pt"})

Reads go through `safetensors.safe_open(framework="numpy")`: the file is memory-mapped and
`get_slice` reads only the bytes of the requested slice, so a loader can place each device's shard
of a tensor without ever holding the whole tensor. bfloat16 comes back as `ml_dtypes.bfloat16`.
Every floating-point read is checked for NaN/Inf (the error names the file and the tensor). A
truncated or corrupt file, an unreadable one, or an unsupported dtype raises `SafetensorsError`,
a `lard_jax.errors.UserError` naming the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

from lard_jax.errors import UserError

# safetensors dtype name -> numpy dtype (what safe_open(framework="numpy") hands out)
_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_EXTRA_FLOATS = (np.dtype(ml_dtypes.bfloat16),)
_FIX = "re-download or re-convert the checkpoint"


class SafetensorsError(UserError):
    """A safetensors file that cannot be read (truncated, corrupt, unsupported dtype, NaN/Inf)."""


def _open(path: str):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, framework="numpy")
    except SafetensorError as e:
        raise SafetensorsError(f"{path}: not a readable safetensors file ({e}); {_FIX}") from None
    except OSError as e:
        raise SafetensorsError(
            f"{path}: cannot read ({e.strerror or e}); check that the file exists and is readable"
        ) from None


def _dtype(path: str, name: str, code: str) -> np.dtype:
    if code not in _DTYPES:
        raise SafetensorsError(
            f"{path}: tensor {name} has dtype {code}, which lard_jax does not read; "
            "convert the checkpoint to float32, float16 or bfloat16"
        )
    return np.dtype(_DTYPES[code])


class LazyTensor:
    """One tensor of an open safetensors file; reads happen on indexing or np.asarray."""

    def __init__(self, handle, path: str, name: str, *, check_finite: bool = True, transposed: bool = False):
        self._handle, self.path, self.name = handle, path, name
        self._slice = handle.get_slice(name)
        self.dtype = _dtype(path, name, self._slice.get_dtype())
        self._shape = tuple(int(d) for d in self._slice.get_shape())
        self.check_finite = check_finite
        self.transposed = transposed

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape[::-1] if self.transposed else self._shape

    @property
    def ndim(self) -> int:
        return len(self._shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self._shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def T(self) -> LazyTensor:  # noqa: N802 (numpy's name)
        view = object.__new__(LazyTensor)
        view.__dict__.update(self.__dict__)
        view.transposed = not self.transposed
        return view

    def _read(self, index: tuple) -> np.ndarray:
        """Stored (untransposed) layout; `index` a tuple of slices, one per dimension."""
        if not self._shape:
            out = np.asarray(self._handle.get_tensor(self.name))
        else:
            sizes = [len(range(*s.indices(n))) for s, n in zip(index, self._shape)]
            if 0 in sizes:  # safetensors refuses to slice an empty range
                out = np.zeros(sizes, self.dtype)
            elif all(s == slice(None) for s in index):
                out = np.asarray(self._handle.get_tensor(self.name))
            else:
                out = np.asarray(self._slice[index])
        if out.dtype != self.dtype:
            out = out.view(self.dtype)
        if self.check_finite and out.size and (np.issubdtype(self.dtype, np.floating) or self.dtype in _EXTRA_FLOATS):
            finite = np.isfinite(out)
            if not finite.all():
                raise SafetensorsError(
                    f"{self.path}: tensor {self.name} holds {int(finite.size - finite.sum())} "
                    f"NaN/Inf value(s); the checkpoint is corrupt: {_FIX}"
                )
        return out

    def __getitem__(self, index) -> np.ndarray:
        if not isinstance(index, tuple):
            index = (index,)
        if any(not isinstance(i, slice) for i in index):  # ints, arrays, ellipsis: read all, index in numpy
            return np.asarray(self)[index]
        index = index + (slice(None),) * (self.ndim - len(index))
        if self.transposed:
            return self._read(index[::-1]).T
        return self._read(index)

    def __array__(self, dtype=None, copy=None):
        out = self._read((slice(None),) * self.ndim)
        out = out.T if self.transposed else out
        return out.astype(dtype) if dtype is not None else out

    def __repr__(self) -> str:
        return f"LazyTensor({self.path}:{self.name}, {self.shape}, {self.dtype}{', T' if self.transposed else ''})"


class SafetensorsFile(Mapping):
    """name -> LazyTensor for every tensor of one file (in the header's order), plus its metadata."""

    def __init__(self, path: str, *, check_finite: bool = True):
        self.path = os.fspath(path)
        self._handle = _open(self.path)
        self.check_finite = check_finite
        self._names = list(self._handle.keys())
        self._cache: dict[str, LazyTensor] = {}

    def metadata(self) -> dict[str, str]:
        return dict(self._handle.metadata() or {})

    def __getitem__(self, name: str) -> LazyTensor:
        if name not in self._cache:
            if name not in self._names:
                raise KeyError(name)
            self._cache[name] = LazyTensor(self._handle, self.path, name, check_finite=self.check_finite)
        return self._cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def open_tensors(path: str, *, check_finite: bool = True) -> SafetensorsFile:
    """name -> LazyTensor of each tensor in the file (memory-mapped; nothing is read until indexed)."""
    return SafetensorsFile(path, check_finite=check_finite)


def read_header(path: str) -> tuple[dict, dict]:
    """({name: {"dtype": code, "shape": [...]}}, metadata) from the header alone, validated by safetensors."""
    handle = _open(path)
    header = {}
    for name in handle.keys():
        s = handle.get_slice(name)
        header[name] = {"dtype": s.get_dtype(), "shape": list(s.get_shape())}
    return header, dict(handle.metadata() or {})


def default_file_mode() -> int:
    """The mode open() gives a new file in this process: 0o666 less the umask (read without changing it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: the only portable way to read it
    os.umask(mask)
    return 0o666 & ~mask


def save_file(
    tensors: Mapping[str, np.ndarray], path: str, metadata: dict | None = None, *, mode: int | None = None
) -> None:
    """Write numpy arrays (bfloat16 as ml_dtypes.bfloat16) to `path` atomically with safetensors.

    The file gets `mode`, by default that of any new file (0o644 under the usual umask; safetensors
    itself creates 0o600 files)."""
    import safetensors.numpy

    arrays = {}
    for name, value in tensors.items():
        arr = np.ascontiguousarray(np.asarray(value))
        if arr.dtype not in _NAMES:
            raise ValueError(f"tensor {name}: dtype {arr.dtype} cannot be written to safetensors here")
        arrays[name] = arr
    meta = {str(k): str(v) for k, v in (metadata or {}).items()} or None
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        safetensors.numpy.save_file(arrays, tmp, metadata=meta)
    except Exception:  # noqa: BLE001 -- older safetensors without numpy bfloat16: hand it the raw bytes
        if os.path.exists(tmp):
            os.remove(tmp)
        from safetensors import serialize_file

        serialize_file(
            {
                name: {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data": a.tobytes()}
                for name, a in arrays.items()
            },
            tmp,
            metadata=meta,
        )
    os.chmod(tmp, default_file_mode() if mode is None else mode)
    os.replace(tmp, path)


def save_sharded(shards: list[dict], folder: str) -> None:
    """Write tensors already grouped into shards to `folder` as transformers does: one shard as
    model.safetensors; several as model-0000i-of-0000n.safetensors plus model.safetensors.index.json
    (total_size and the weight map)."""
    if not shards:
        raise ValueError(f"save_sharded({folder}): no tensors to write")
    for name in os.listdir(folder):  # a previous save's weights: transformers would read those first
        if name == "model.safetensors.index.json" or (name.startswith("model") and name.endswith(".safetensors")):
            os.remove(os.path.join(folder, name))
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, "model.safetensors"), {"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, fname), {"format": "pt"})
        weight_map.update({n: fname for n in shard})
        total += sum(t.nbytes for t in shard.values())
    index = os.path.join(folder, "model.safetensors.index.json")
    with open(index + ".tmp", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    os.replace(index + ".tmp", index)
