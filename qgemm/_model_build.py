"""How a :class:`qgemm.models.DLRM` is built: random weights and tables, facebookresearch/dlrm
``state_dict`` parsing and writing, synthetic request batches.

Every function here returns plain parts (layer lists, tables, arrays); the class in
:mod:`qgemm.models` validates them and is the public face (``DLRM.random``,
``DLRM.from_state_dict``, ``DLRM.state_dict``, ``DLRM.random_inputs``).  :func:`random_table` is
public through :mod:`qgemm.models`.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np

from . import _config
from ._kernels.dlrm import fill_uniform_kernel
from ._validate import as_array, check_finite, check_int

__all__ = [
    "parse_state_dict",
    "random_batch",
    "random_parts",
    "random_table",
    "read_npz",
    "to_state_dict",
    "write_npz",
]

Layers = list[tuple[Any, Any]]

_INDEX_DTYPES = (np.int32, np.int64)
_KEY_RE = re.compile(r"^(?:module\.)?(bot_l|top_l)\.(\d+)\.(weight|bias)$")
_EMB_RE = re.compile(r"^(?:module\.)?emb_l\.(\d+)\.weight$")


def _to_numpy(name: str, v: Any) -> np.ndarray:
    """An array from a numpy array, a list, or a torch tensor (duck-typed: torch is never
    imported here), cast to float32."""
    if hasattr(v, "detach") and hasattr(v, "cpu") and not isinstance(v, np.ndarray):
        v = v.detach().cpu()
        if hasattr(v, "is_quantized") and v.is_quantized:
            raise TypeError(f"{name}: expected a float tensor, got a quantized tensor")
        if hasattr(v, "is_floating_point") and not v.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {v.dtype}")
        v = v.float().numpy()
    a = as_array(name, v)
    if a.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point array, got dtype {a.dtype.name}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    check_finite(name, a)  # a NaN/inf weight would silently turn every prediction to NaN
    return a


def random_parts(
    *,
    tables: int,
    rows: int | Sequence[int],
    dim: int,
    bottom: Sequence[int],
    top: Sequence[int],
    self_interaction: bool,
    emb_range: float | None,
    seed: int,
) -> tuple[Layers, Layers, list[np.ndarray]]:
    """``(bottom layers, top layers, tables)`` of :meth:`qgemm.models.DLRM.random` (see there
    for the initialisation)."""
    tables = check_int("tables", tables, minimum=1)
    dim = check_int("dim", dim, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    if isinstance(rows, (int, np.integer)) and not isinstance(rows, bool):
        rows_l = [check_int("rows", rows, minimum=1)] * tables
    else:
        rows_l = [
            check_int(f"rows[{k}]", r, minimum=1) for k, r in enumerate(cast(Sequence[int], rows))
        ]
        if len(rows_l) != tables:
            raise ValueError(
                f"rows: expected {tables} row counts (one per table), got {len(rows_l)}"
            )
    bottom = [check_int(f"bottom[{i}]", s, minimum=1) for i, s in enumerate(bottom)]
    top = [check_int(f"top[{i}]", s, minimum=1) for i, s in enumerate(top)]
    if len(bottom) < 2:
        raise ValueError(f"bottom: expected at least 2 sizes (inputs and outputs), got {bottom}")
    if bottom[-1] != dim:
        raise ValueError(f"bottom: expected the last size to equal dim={dim}, got {bottom[-1]}")
    if not top:
        raise ValueError("top: expected at least one size, got none")
    if emb_range is None:
        emb_range = 1.0 / np.sqrt(dim)
    emb_range = float(emb_range)
    if not (np.isfinite(emb_range) and emb_range >= 0):
        raise ValueError(f"emb_range: expected a finite value >= 0, got {emb_range}")
    n = tables + 1
    pairs = n * (n + 1) // 2 if self_interaction else n * (n - 1) // 2
    top_sizes = [dim + pairs, *top]
    rng = np.random.default_rng(seed)

    def mlp(sizes: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        layers = []
        for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
            w = rng.standard_normal((n_out, n_in), dtype=np.float32)
            w *= np.float32(np.sqrt(2.0 / (n_in + n_out)))
            b = rng.standard_normal(n_out, dtype=np.float32)
            b *= np.float32(np.sqrt(1.0 / n_out))
            layers.append((w, b))
        return layers

    bot_layers = mlp(bottom)
    top_layers = mlp(top_sizes)
    tabs = [
        random_table(r, dim, low=-emb_range, high=emb_range, seed=seed * 1_000_003 + k)
        for k, r in enumerate(rows_l)
    ]
    return bot_layers, top_layers, tabs


def parse_state_dict(
    state_dict: Mapping[str, Any], self_interaction: bool | None
) -> tuple[Layers, Layers, list[np.ndarray], Any]:
    """``(bottom layers, top layers, tables, self_interaction)`` from a facebookresearch/dlrm
    ``state_dict`` (see :meth:`qgemm.models.DLRM.from_state_dict`); ``self_interaction`` as
    given, or inferred from the top MLP's input size when None."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict: expected a mapping of name -> array, got {type(state_dict).__name__}"
        )
    mlps: dict[str, dict[int, dict[str, np.ndarray]]] = {"bot_l": {}, "top_l": {}}
    embs: dict[int, np.ndarray] = {}
    for key, value in state_dict.items():
        m = _KEY_RE.match(str(key))
        if m:
            part, j, kind = m.group(1), int(m.group(2)), m.group(3)
            mlps[part].setdefault(j, {})[kind] = _to_numpy(f"state_dict[{key!r}]", value)
            continue
        m = _EMB_RE.match(str(key))
        if m:
            embs[int(m.group(1))] = _to_numpy(f"state_dict[{key!r}]", value)
            continue
        raise ValueError(
            f"state_dict: unsupported key {key!r} (expected bot_l.J.weight/"
            f"bias, top_l.J.weight/bias, emb_l.K.weight)"
        )
    layers = {}
    for part, found in mlps.items():
        if not found:
            raise ValueError(f"state_dict: no {part}.*.weight keys")
        lst = []
        for j in sorted(found):
            entry = found[j]
            if "weight" not in entry:
                raise ValueError(f"state_dict: {part}.{j}.bias without {part}.{j}.weight")
            lst.append((entry["weight"], entry.get("bias")))
        layers[part] = lst
    if not embs:
        raise ValueError("state_dict: no emb_l.K.weight keys")
    if sorted(embs) != list(range(len(embs))):
        raise ValueError(
            f"state_dict: embedding tables must be numbered 0..{len(embs) - 1}, got {sorted(embs)}"
        )
    tabs = [embs[k] for k in range(len(embs))]
    if self_interaction is None:
        n = len(tabs) + 1
        d = tabs[0].shape[1] if tabs[0].ndim == 2 else 0
        top_in = layers["top_l"][0][0].shape[1] if layers["top_l"][0][0].ndim == 2 else 0
        self_interaction = top_in == d + n * (n + 1) // 2
    return layers["bot_l"], layers["top_l"], tabs, self_interaction


def to_state_dict(bottom: Layers, top: Layers, tables: Sequence[Any]) -> dict[str, np.ndarray]:
    """Float layers and tables in facebookresearch/dlrm's ``state_dict`` layout (no copies)."""
    sd: dict[str, np.ndarray] = {}
    for part, layers in (("bot_l", bottom), ("top_l", top)):
        for i, (w, b) in enumerate(layers):
            sd[f"{part}.{2 * i}.weight"] = w
            if b is not None:
                sd[f"{part}.{2 * i}.bias"] = b
    for k, t in enumerate(tables):
        sd[f"emb_l.{k}.weight"] = t
    return sd


def random_batch(
    table_rows: Sequence[int],
    num_dense: int,
    batch: int,
    *,
    pooling: int,
    seed: int | None,
    index_dtype: Any,
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """``(dense, indices, offsets)`` of :meth:`qgemm.models.DLRM.random_inputs`."""
    batch = check_int("batch", batch, minimum=0)
    pooling = check_int("pooling", pooling, minimum=1)
    index_dtype = np.dtype(index_dtype)
    if index_dtype not in [np.dtype(d) for d in _INDEX_DTYPES]:
        raise TypeError(f"index_dtype: expected int32 or int64, got {index_dtype.name}")
    rng = np.random.default_rng(seed)
    dense = rng.random((batch, num_dense), dtype=np.float32)
    indices, offsets = [], []
    for rows in table_rows:
        lengths = rng.integers(1, 2 * pooling, size=batch)
        off = np.zeros(batch, dtype=index_dtype)
        if batch > 1:
            np.cumsum(lengths[:-1], out=off[1:])
        total = int(lengths.sum())
        indices.append(rng.integers(0, rows, size=total, dtype=index_dtype))
        offsets.append(off)
    return dense, indices, offsets


def random_table(
    rows: int, dim: int, *, low: float = -1.0, high: float = 1.0, seed: int = 0
) -> np.ndarray:
    """A float32 ``[rows, dim]`` table uniform in ``[low, high]`` (SplitMix64 of each
    element's position, so the same ``seed`` gives the same table for any thread count).

    Examples
    --------
    >>> t = random_table(1000, 8, low=-1, high=1, seed=3)
    >>> t.shape, t.dtype, bool(t.min() >= -1 and t.max() <= 1)
    ((1000, 8), dtype('float32'), True)
    """
    rows = check_int("rows", rows, minimum=0)
    dim = check_int("dim", dim, minimum=0)
    seed = check_int("seed", seed, minimum=0)
    low, high = float(low), float(high)
    if not (np.isfinite(low) and np.isfinite(high) and low <= high):
        raise ValueError(f"low, high: expected finite low <= high, got {low}, {high}")
    out = np.empty((rows, dim), dtype=np.float32)
    if out.size:
        _config.sync_threads()
        fill_uniform_kernel(())(
            out, np.uint64(seed % 2**64), np.float32(low), np.float32(high - low)
        )
    return out


# -- .npz files: validated reads, atomic writes ----------------------------------------------


def _file_name(path: Any) -> str:
    return os.fspath(path) if isinstance(path, (str, os.PathLike)) else repr(path)


def read_npz(path: Any) -> tuple[dict[str, np.ndarray], bool | None]:
    """``(arrays, self_interaction or None)`` from a ``DLRM.save`` ``.npz``, never unpickling.

    A truncated, tampered or non-``.npz`` file, or an entry holding pickled objects, raises
    ``ValueError`` naming the file (and the entry); a missing file ``FileNotFoundError``."""
    name = _file_name(path)
    try:
        f = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{name}: not a valid .npz file (truncated or corrupt?): {exc}") from exc
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{name}: expected an .npz archive (as written by DLRM.save), got a single .npy array"
        )
    arrays: dict[str, np.ndarray] = {}
    with f:
        for key in f.files:
            try:
                arrays[key] = f[key]
            except ValueError as exc:
                if "allow_pickle" in str(exc) or "bject arrays" in str(exc):
                    raise ValueError(
                        f"{name}: entry {key!r} holds pickled Python objects (object dtype); "
                        f"refusing to unpickle -- expected plain numeric arrays"
                    ) from None
                raise ValueError(f"{name}: entry {key!r} is corrupt: {exc}") from exc
            except (EOFError, OSError, zipfile.BadZipFile, zlib.error) as exc:
                raise ValueError(f"{name}: entry {key!r} is truncated or corrupt: {exc}") from exc
    si = arrays.pop("_self_interaction", None)
    if si is None:
        return arrays, None
    if si.shape != () or si.dtype.kind not in "bi":
        raise ValueError(
            f"{name}: entry '_self_interaction': expected a scalar bool, got "
            f"dtype {si.dtype.name} shape {si.shape}"
        )
    return arrays, bool(si)


def write_npz(path: Any, arrays: Mapping[str, np.ndarray]) -> None:
    """``np.savez(path, **arrays)``, atomically for a path: written to a temporary file in the
    same folder and renamed over ``path``, so an interrupt (KeyboardInterrupt, a full disk)
    leaves either the old file or the new one, never half of one.  A ``.npz`` suffix is
    appended when missing (as numpy does)."""
    if not isinstance(path, (str, os.PathLike)):
        np.savez(path, **arrays)  # type: ignore[arg-type]  # a file object: the caller owns it
        return
    path = os.fspath(path)
    if not path.endswith(".npz"):
        path += ".npz"
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "xb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
