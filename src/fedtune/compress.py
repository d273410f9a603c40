"""Codecs that turn a dict of tensors into one Flower ArrayRecord to send, and back.

Why a module of its own: bytes per round dominate a federation's cost, and the same codec
runs in both directions (server to clients, clients to server). Keeping it free of
model, config and Flower-app code lets both apps use it and lets tests check every byte.

Wire layout (`count_bytes()` counts each Array's data plus its key):
- fp32, fp16: Flower's own numpy Arrays under the tensor names, as `ArrayRecord(state)` makes
  them, so any Flower strategy can still average them; no tag.
- bf16: raw little-endian bf16 bytes under the tensor names, dtype "bfloat16" (numpy has no
  bf16, and Flower refuses torch.bfloat16).
- int8, topk, topk-int8 send the update (tensors - reference) and carry a "::codec" tag
  (JSON: mode, block, names and shapes in order), so the receiver needs no config to decode.
  Their Arrays are keyed by the tensor's position in the tag ("3::q"): names of 60+
  characters repeated in every key cost ~15 % of a small LoRA tensor's bytes. They use the
  stype `RAW`, which Flower's `.numpy()` refuses: such a record cannot be averaged by mistake
  before it is decoded. Index masks and int8 values are zlib-compressed (level 1, stype
  `PACKED`) when that is smaller: a 10 % bitmask shrinks to ~0.58 and top-k's int8 values to
  ~0.86 of their size, which takes topk-int8 past 20x fewer bytes than fp32.
- Whatever the codec, `bundle` then folds every Array under 1 MiB into one Array
  ("::bundle": an 8-byte index length, the JSON index, the Arrays' bytes in order), and
  `unbundle` restores the record exactly, keys in their order. Flower's deployment runtime
  moves each Array as objects of its own, one HTTP request per object on each of the six
  hops of a round trip: the demo's LoRA adapter (240 tensors) was 483 objects, and moving
  them cost more than a client's training on the demo (docs/benchmarks.md). Larger Arrays
  travel as they are, so bundling never copies a big tensor.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from typing import get_args

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedtune.config.schema import Compression as Mode
from fedtune.errors import ConfigError, ModelError

MODES: tuple[str, ...] = get_args(Mode)  # the recipe's `comm.uplink` / `comm.downlink` choices
DELTA_MODES = ("int8", "topk", "topk-int8")  # these send tensors - reference, with error feedback
NUMPY = "numpy.ndarray"  # Flower's stype for np.save bytes (its SType.NUMPY is a private name)
RAW = "fedtune.raw"  # stype: the tensor's bytes as torch holds them (little-endian, C order)
PACKED = "fedtune.raw+zlib"  # stype: RAW bytes, zlib-compressed
ZLIB_LEVEL = 1  # 65 ms per 2.5 MB mask here; level 9 is 30x slower for 6 % fewer bytes
TAG = "::codec"  # no parameter name starts with "::", so the tag cannot collide
BUNDLE = "::bundle"  # the Arrays `bundle` folded into one
BUNDLE_MAX_BYTES = 1 << 20  # Arrays below this travel bundled; above it, on their own
_INDEX = {"int32": torch.int32, "int64": torch.int64}
_RAW_DTYPES = {"bfloat16": torch.bfloat16, "int8": torch.int8, "float32": torch.float32, **_INDEX}


@dataclass(frozen=True)
class Codec:
    """How tensors travel; the receiver reads the mode from the record, not from this."""

    mode: Mode = "fp32"  # fp32 is exact; the others trade accuracy for bytes
    topk_fraction: float = 0.1  # share of each tensor's entries that topk modes send
    block: int = 128  # values per float32 scale in the int8 modes

    def __post_init__(self):
        problems = []
        if self.mode not in MODES:
            problems.append(f"codec mode {self.mode!r}: must be one of {', '.join(MODES)}")
        if not 0 < self.topk_fraction <= 1:
            problems.append(f"codec topk_fraction {self.topk_fraction}: must be in (0, 1]")
        if not 64 <= self.block <= 256:
            problems.append(f"codec block {self.block}: must be 64..256")
        if problems:
            raise ConfigError(problems)


def encode(
    tensors: dict[str, torch.Tensor],
    codec: Codec,
    reference: dict[str, torch.Tensor] | None = None,
    residual: dict[str, torch.Tensor] | None = None,
) -> tuple[ArrayRecord, dict[str, torch.Tensor] | None]:
    """(record to send, new residual). fp32/fp16/bf16 send the tensors themselves and return
    no residual. int8/topk/topk-int8 send `tensors - reference` (+ `residual`, what earlier
    rounds left unsent) and return what this record leaves unsent, so nothing is lost."""
    record = ArrayRecord()
    if codec.mode in ("fp32", "fp16"):
        dtype = torch.float32 if codec.mode == "fp32" else torch.float16
        for name, t in tensors.items():
            record[name] = Array(t.detach().to("cpu", dtype).contiguous().numpy())
        return record, None
    if codec.mode == "bf16":
        for name, t in tensors.items():
            record[name] = _raw(t.detach().to("cpu", torch.bfloat16), "bfloat16", t.shape)
        return record, None

    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    ref = _matching(reference, shapes, "reference", codec.mode)
    old = _matching(residual, shapes, "residual", codec.mode) if residual is not None else {}
    tag = {"mode": codec.mode, "block": codec.block, "shapes": shapes}
    data = json.dumps(tag, separators=(",", ":")).encode()
    record[TAG] = Array(dtype="json", shape=(len(data),), stype=RAW, data=data)
    new_residual = {}
    for i, (name, t) in enumerate(tensors.items()):
        acc = (_f32(t) - _f32(ref[name])).reshape(-1)
        if name in old:
            acc += _f32(old[name]).reshape(-1)
        if codec.mode == "int8":
            q, scale = _quantize(acc, codec.block)
            record[f"{i}::q"] = _raw(q, "int8", q.shape, pack=True)
            record[f"{i}::scale"] = _raw(scale, "float32", scale.shape)
            acc -= _dequantize(q, scale, codec.block)
        else:
            idx = _select(acc, codec.topk_fraction)
            record.update(_index_arrays(str(i), idx, acc.numel()))
            values = acc[idx]
            if codec.mode == "topk":
                record[f"{i}::val"] = _raw(values, "float32", values.shape)
            else:
                q, scale = _quantize(values, codec.block)
                record[f"{i}::q"] = _raw(q, "int8", q.shape, pack=True)
                record[f"{i}::scale"] = _raw(scale, "float32", scale.shape)
                values = _dequantize(q, scale, codec.block)
            acc[idx] -= values
        new_residual[name] = acc.view(shapes[name])
    return record, new_residual


def decode(
    record: ArrayRecord, reference: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """float32 CPU tensors with the encoded names and shapes; the codec comes from the record,
    and the delta modes add the decoded update to `reference` (the weights the sender had)."""
    if TAG not in record:
        return {name: _plain(name, array) for name, array in record.items()}
    tag = json.loads(record[TAG].data)
    mode, block = tag["mode"], tag["block"]
    shapes = {name: tuple(shape) for name, shape in tag["shapes"].items()}
    if mode not in DELTA_MODES:
        raise ModelError(f"record has codec {mode!r}, which this fedtune cannot decode")
    ref = _matching(reference, shapes, "reference", mode)
    out = {}
    for i, (name, shape) in enumerate(shapes.items()):
        n = math.prod(shape)
        if mode == "int8":
            update = _dequantize(_unraw(record[f"{i}::q"]), _unraw(record[f"{i}::scale"]), block)
        else:
            idx = _read_index(record, str(i), n)
            if mode == "topk":
                values = _unraw(record[f"{i}::val"])
            else:
                q, scale = _unraw(record[f"{i}::q"]), _unraw(record[f"{i}::scale"])
                values = _dequantize(q, scale, block)
            update = torch.zeros(n)
            update[idx] = values
        out[name] = _f32(ref[name]) + update.view(shape)
    return out


def bundle(record: ArrayRecord, max_bytes: int = BUNDLE_MAX_BYTES) -> ArrayRecord:
    """The record with every Array of fewer than `max_bytes` bytes folded into one Array
    (see the module docstring); a record with fewer than two such Arrays is returned as is."""
    small = {k for k, a in record.items() if len(a.data) < max_bytes}
    if len(small) < 2:
        return record
    index, parts, out = [], [], ArrayRecord()
    for key, array in record.items():
        if key in small:
            index.append([key, array.dtype, list(array.shape), array.stype, len(array.data)])
            parts.append(array.data)
        else:
            index.append([key])  # travels on its own; listed to keep the record's order
    head = zlib.compress(json.dumps(index, separators=(",", ":")).encode(), ZLIB_LEVEL)
    data = b"".join([len(head).to_bytes(8, "little"), head, *parts])
    out[BUNDLE] = Array(dtype="bundle", shape=(len(data),), stype=RAW, data=data)
    for key, array in record.items():
        if key not in small:
            out[key] = array
    return out


def unbundle(record: ArrayRecord) -> ArrayRecord:
    """The record `bundle` was given (an unbundled record is returned as is); a bundle that
    does not add up (a hostile or broken sender) is a ModelError, never a partial record."""
    if BUNDLE not in record:
        return record
    data = record[BUNDLE].data
    try:
        size = int.from_bytes(data[:8], "little")
        index = json.loads(zlib.decompress(data[8 : 8 + size]))
        pos, out = 8 + size, ArrayRecord()
        for entry in index:
            if len(entry) == 1:
                out[entry[0]] = record[entry[0]]
                continue
            key, dtype, shape, stype, n = entry
            out[key] = Array(dtype=dtype, shape=tuple(shape), stype=stype, data=data[pos : pos + n])
            pos += n
    except (ValueError, TypeError, KeyError, zlib.error) as err:
        raise ModelError(f"unreadable {BUNDLE} array: {err!r}") from None
    alone = set(record.keys()) - {BUNDLE}
    if pos != len(data) or alone - set(out.keys()):
        raise ModelError(
            f"{BUNDLE} array does not add up: {len(data) - pos} bytes left over, "
            f"arrays outside its index: {sorted(alone - set(out.keys()))[:2]}"
        )
    return out


def residual_record(residual: dict[str, torch.Tensor]) -> ArrayRecord:
    """The residual as an exact fp32 ArrayRecord: in deployment each message is a fresh
    process, so a client keeps its residual in `context.state` between rounds."""
    record = ArrayRecord()
    for name, t in residual.items():
        record[name] = Array(_f32(t).contiguous().numpy())
    return record


def residual_from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Inverse of `residual_record`."""
    return {name: torch.from_numpy(array.numpy()) for name, array in record.items()}


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32)


def _raw(t: torch.Tensor, dtype: str, shape, pack: bool = False) -> Array:
    """Array of the tensor's own bytes: no numpy header, and dtypes numpy lacks (bf16);
    with `pack`, zlib-compressed when that is smaller."""
    return _bytes_array(
        t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes(), dtype, shape, pack
    )


def _bytes_array(data: bytes, dtype: str, shape, pack: bool) -> Array:
    if pack:
        packed = zlib.compress(data, ZLIB_LEVEL)
        if len(packed) < len(data):
            return Array(dtype=dtype, shape=tuple(shape), stype=PACKED, data=packed)
    return Array(dtype=dtype, shape=tuple(shape), stype=RAW, data=data)


def _payload(array: Array) -> bytes:
    """The RAW bytes of an Array, unpacked if it was packed."""
    return zlib.decompress(array.data) if array.stype == PACKED else array.data


def _unraw(array: Array) -> torch.Tensor:
    """Flat tensor from a `_raw` Array (bytearray: torch wants a writable buffer)."""
    dtype = _RAW_DTYPES.get(array.dtype)
    if dtype is None:
        raise ModelError(f"raw array of dtype {array.dtype!r}: decode cannot read it")
    data = _payload(array)
    if not data:  # torch.frombuffer rejects an empty buffer
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype)


def _plain(name: str, array: Array) -> torch.Tensor:
    """A tensor of an untagged record: Flower numpy Arrays (fp32, fp16) or raw bf16."""
    if array.stype == NUMPY:
        return torch.from_numpy(array.numpy()).float()
    if array.stype == RAW and array.dtype == "bfloat16":
        return _unraw(array).float().view(array.shape)
    raise ModelError(
        f"array {name!r} is {array.dtype}/{array.stype}, which decode cannot read; "
        "was it sent by another fedtune version?"
    )


def _matching(given, shapes: dict[str, tuple], what: str, mode: str) -> dict:
    """`given` if it has exactly the keys and shapes of the tensors, else a ModelError."""
    if given is None:
        raise ModelError(
            f"codec {mode} sends the update against a reference, but none was given; "
            "pass the global weights the client received"
        )
    missing = sorted(shapes.keys() - given.keys())
    extra = sorted(given.keys() - shapes.keys())
    wrong = [
        f"{n}: {tuple(given[n].shape)} vs {shapes[n]}"
        for n in shapes
        if n in given and tuple(given[n].shape) != shapes[n]
    ]
    if missing or extra or wrong:
        raise ModelError(
            f"codec {mode}: the {what} does not match the tensors: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]}), "
            f"{len(wrong)} with another shape (e.g. {wrong[:2]}); "
            "do server and clients use one recipe?"
        )
    return given


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """x (flat) zero-padded to whole blocks, one block per row."""
    rows = -(-x.numel() // block)
    if rows * block == x.numel():
        return x.view(rows, block)
    padded = torch.zeros(rows * block, dtype=x.dtype)
    padded[: x.numel()] = x
    return padded.view(rows, block)


def _quantize(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise absmax int8: (q, scale) with scale = absmax/127 per block, so each value
    is off by at most scale/2 and a block of zeros stays exactly zero."""
    rows = _blocks(x, block)
    scale = rows.abs().amax(dim=1) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(rows / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(-1)[: x.numel()], scale


def _dequantize(q: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    return (_blocks(q.float(), block) * scale[:, None]).reshape(-1)[: q.numel()]


def _topk_count(numel: int, fraction: float) -> int:
    """k = ceil(fraction * numel), at least 1; rounding first keeps 0.1 * 30 at 3, not 4."""
    return 0 if numel == 0 else min(numel, max(1, math.ceil(round(fraction * numel, 6))))


def _select(acc: torch.Tensor, fraction: float) -> torch.Tensor:
    """Ascending flat indices of the k largest |acc|, exactly k even with ties (kthvalue and
    a mask: on CPU twice as fast as torch.topk plus a sort)."""
    magnitude = acc.abs()
    k = _topk_count(magnitude.numel(), fraction)
    if k == 0:
        return torch.empty(0, dtype=torch.long)
    cut = torch.kthvalue(magnitude, magnitude.numel() - k + 1).values
    mask = magnitude > cut
    ties = (magnitude == cut).nonzero().squeeze(1)
    mask[ties[: k - int(mask.sum())]] = True
    return mask.nonzero().squeeze(1)


def _index_arrays(key: str, idx: torch.Tensor, numel: int) -> dict[str, Array]:
    """The cheaper of int32/int64 indices (4 or 8 bytes per entry) and a bitmask (n/8 bytes,
    then zlib-packed): past 1 entry in 32 the mask wins, and a 10 % mask packs to ~0.58."""
    wide = numel > 2**31 - 1
    if idx.numel() * (8 if wide else 4) <= -(-numel // 8):
        dtype = "int64" if wide else "int32"
        return {f"{key}::idx": _raw(idx.to(_INDEX[dtype]), dtype, idx.shape)}
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[idx] = True
    data = np.packbits(mask.numpy(), bitorder="little").tobytes()
    return {f"{key}::mask": _bytes_array(data, "bits", (numel,), pack=True)}


def _read_index(record: ArrayRecord, key: str, numel: int) -> torch.Tensor:
    if f"{key}::idx" in record:
        return _unraw(record[f"{key}::idx"]).long()
    packed = np.frombuffer(_payload(record[f"{key}::mask"]), dtype=np.uint8)
    mask = np.unpackbits(packed, count=numel, bitorder="little").view(bool)
    return torch.from_numpy(np.flatnonzero(mask))
