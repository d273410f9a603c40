"""Codecs checked against hand computations: error bounds per int8 block, brute-force top-k,
error feedback that loses nothing over rounds, and the exact bytes each mode puts on the
wire (what `count_bytes()`, and so bytes_up / bytes_down, reports)."""

import json
import math
import zlib

import pytest
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from fedtune.compress import (
    BUNDLE,
    BUNDLE_MAX_BYTES,
    MODES,
    PACKED,
    TAG,
    Codec,
    bundle,
    decode,
    encode,
    residual_from_record,
    residual_record,
    unbundle,
)
from fedtune.errors import ConfigError, ModelError

NPY_HEADER = 128  # np.save's v1.0 header, padded to 64 bytes: 128 for these shapes
F32_EPS = torch.finfo(torch.float32).eps


def random_state(shapes: dict, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {name: torch.randn(shape) for name, shape in shapes.items()}


def over_the_wire(record: ArrayRecord) -> ArrayRecord:
    """The record as a receiver rebuilds it from Flower's serialized objects."""
    arrays = {a.object_id: Array.inflate(a.deflate(), children=a.children) for a in record.values()}
    return ArrayRecord.inflate(record.deflate(), children=arrays)


def sent_update(record: ArrayRecord, like: dict) -> dict[str, torch.Tensor]:
    """What a delta record carries: decoded against a zero reference."""
    return decode(record, {name: torch.zeros_like(t) for name, t in like.items()})


def raw_floats(array: Array) -> torch.Tensor:
    return torch.frombuffer(bytearray(array.data), dtype=torch.float32)


def payload(array: Array) -> bytes:
    """An Array's bytes before zlib packing (the packed ones are checked to be zlib's)."""
    return zlib.decompress(array.data) if array.stype == PACKED else array.data


SHAPES = {"layer.weight": (64, 100), "layer.bias": (100,), "scalar": ()}


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_survives_flowers_serialization(mode):
    ref = random_state(SHAPES, 0)
    tensors = {n: t + torch.randn_like(t) for n, t in ref.items()}
    record, _ = encode(tensors, Codec(mode), ref)
    here, there = decode(record, ref), decode(over_the_wire(record), ref)
    assert list(there) == list(tensors)
    for name, t in tensors.items():
        assert there[name].dtype == torch.float32 and there[name].shape == t.shape
        assert torch.equal(there[name], here[name])


def test_fp32_is_exact_and_is_todays_record():
    tensors = random_state(SHAPES, 1)
    tensors["half"] = torch.randn(3, 5).bfloat16()  # bf16 parameters go as fp32, exactly
    record, residual = encode(tensors, Codec("fp32"))
    assert residual is None and TAG not in record
    out = decode(record)
    for name, t in tensors.items():
        assert torch.equal(out[name], t.float())
        assert record[name].data == ArrayRecord({name: t.float()})[name].data
    assert record.to_torch_state_dict().keys() == tensors.keys()  # any Flower strategy reads it


def test_fp16_rounds_like_half():
    tensors = random_state(SHAPES, 2)
    out = decode(encode(tensors, Codec("fp16"))[0])
    for name, t in tensors.items():
        assert torch.equal(out[name], t.half().float())


def test_bf16_round_trip_is_bit_exact_at_two_bytes_per_value():
    torch.manual_seed(3)
    tensors = {"w": torch.randn(33, 7).bfloat16(), "s": torch.randn(()).bfloat16()}
    record, _ = encode(tensors, Codec("bf16"))
    out = decode(over_the_wire(record))
    for name, t in tensors.items():
        assert out[name].dtype == torch.float32 and out[name].shape == t.shape
        assert torch.equal(out[name].bfloat16(), t)
    assert record.count_bytes() == sum(2 * t.numel() + len(n) for n, t in tensors.items())
    fp32 = {"w": torch.randn(10, 10)}  # fp32 input is rounded to bf16 once
    assert torch.equal(decode(encode(fp32, Codec("bf16"))[0])["w"], fp32["w"].bfloat16().float())


def test_int8_error_is_at_most_half_a_step_in_every_block():
    torch.manual_seed(4)
    ref = {"w": torch.randn(5, 77)}  # 385 values: 3 blocks of 128 and one of 1
    scales = torch.logspace(-4, 1, 385).view(5, 77)  # blocks of very different magnitude
    tensors = {"w": ref["w"] + torch.randn(5, 77) * scales}
    record, _ = encode(tensors, Codec("int8", block=128), ref)
    original = tensors["w"].flatten()
    update = (tensors["w"] - ref["w"]).flatten()
    error = (decode(record, ref)["w"].flatten() - original).abs()
    stored = raw_floats(record["0::scale"])
    assert stored.numel() == 4
    for b, start in enumerate(range(0, 385, 128)):
        scale = update[start : start + 128].abs().max() / 127
        assert stored[b] == scale
        slack = 4 * F32_EPS * (original.abs().max() + ref["w"].abs().max())
        assert error[start : start + 128].max() <= scale / 2 + slack
    assert error.max() > 0  # lossy: the bound is what is being tested


def test_int8_block_of_zeros_decodes_to_exactly_the_reference():
    ref = random_state({"w": (300,)}, 5)
    update = torch.randn(300)
    update[128:256] = 0  # the second block does not change
    record, _ = encode({"w": ref["w"] + update}, Codec("int8"), ref)
    out = decode(record, ref)["w"]
    assert torch.equal(out[128:256], ref["w"][128:256])
    assert raw_floats(record["0::scale"])[1] == 0


@pytest.mark.parametrize("shape", [(), (1,), (0,), (3, 43), (64,), (65,)])
def test_int8_odd_sizes(shape):
    ref = random_state({"w": shape}, 6)
    tensors = {"w": ref["w"] + torch.randn(shape)}
    record, _ = encode(tensors, Codec("int8", block=64), ref)
    out = decode(over_the_wire(record), ref)["w"]
    assert out.shape == torch.Size(shape) and out.dtype == torch.float32
    n = math.prod(shape)
    assert len(payload(record["0::q"])) == n and len(record["0::scale"].data) == 4 * -(-n // 64)
    if n:  # no block's scale/2 exceeds the largest |update| / 254
        bound = (tensors["w"] - ref["w"]).abs().max() / 254 + 1e-5
        assert (out - tensors["w"]).abs().max() <= bound


def test_topk_sends_exactly_the_k_largest_of_update_plus_residual():
    shapes = {"a": (30,), "b": (40, 25), "c": ()}
    ref, residual = random_state(shapes, 7), random_state(shapes, 8)
    tensors = {n: t + torch.randn_like(t) for n, t in ref.items()}
    record, new = encode(tensors, Codec("topk", topk_fraction=0.1), ref, residual)
    sent = sent_update(record, ref)
    for name, k in (("a", 3), ("b", 100), ("c", 1)):  # ceil(0.1 n)
        acc = (tensors[name] - ref[name] + residual[name]).flatten()
        got = sent[name].flatten()
        chosen = set(got.nonzero().flatten().tolist())
        brute = sorted(range(acc.numel()), key=lambda i: -abs(acc[i].item()))[:k]
        assert chosen == set(brute)
        idx = torch.tensor(brute, dtype=torch.long)
        assert torch.equal(got[idx], acc[idx])  # fp32 values travel exactly
        left = new[name].flatten()
        assert torch.equal(left[idx], torch.zeros(k))
        rest = torch.ones(acc.numel(), dtype=torch.bool)
        rest[idx] = False
        assert torch.equal(left[rest], acc[rest])


@pytest.mark.parametrize(
    "fraction, numel, k",
    [(0.07, 100, 7), (0.1, 30, 3), (0.25, 10, 3), (0.001, 10, 1), (1.0, 17, 17), (0.5, 1, 1)],
)
def test_topk_k_is_ceil_of_fraction_times_numel(fraction, numel, k):
    """0.07 * 100 is 7.000000000000001 in floats: k must still be 7, not 8."""
    ref = {"w": torch.zeros(numel)}
    torch.manual_seed(15)
    record, _ = encode({"w": torch.randn(numel)}, Codec("topk", topk_fraction=fraction), ref)
    assert int((sent_update(record, ref)["w"] != 0).sum()) == k


def test_topk_ties_still_send_exactly_k():
    ref = {"w": torch.zeros(1000)}
    record, _ = encode({"w": torch.ones(1000)}, Codec("topk", topk_fraction=0.05), ref)
    assert int((sent_update(record, ref)["w"] != 0).sum()) == 50


@pytest.mark.parametrize("mode", ["topk", "topk-int8", "int8"])
def test_error_feedback_loses_nothing_over_rounds(mode):
    shapes = {"w": (50, 20), "b": (7,), "s": ()}
    codec = Codec(mode, topk_fraction=0.1, block=64)
    total_sent = {n: torch.zeros(s) for n, s in shapes.items()}
    total_update = {n: torch.zeros(s) for n, s in shapes.items()}
    residual = None
    for r in range(6):
        ref = random_state(shapes, 100 + r)  # a new global model every round
        tensors = {n: t + 0.1 * torch.randn_like(t) for n, t in ref.items()}
        record, residual = encode(tensors, codec, ref, residual)
        for name, u in sent_update(record, ref).items():
            total_sent[name] += u
            total_update[name] += tensors[name] - ref[name]
    for name in shapes:
        assert torch.allclose(total_sent[name] + residual[name], total_update[name], atol=1e-5)
    assert residual["w"].abs().max() > (0.01 if mode.startswith("topk") else 0)


def test_without_error_feedback_topk_loses_what_it_did_not_send():
    """The identity above can fail: rounds that drop their residual lose the update."""
    ref = {"w": torch.zeros(100)}
    torch.manual_seed(9)
    updates = [torch.randn(100) for _ in range(3)]
    total = sum(sent_update(encode({"w": u}, Codec("topk"), ref)[0], ref)["w"] for u in updates)
    assert not torch.allclose(total, sum(updates), atol=1e-3)


def expected_bytes(mode: str, shapes: dict, fraction: float, block: int = 128) -> int:
    """count_bytes() by hand, before zlib packing: each Array's data plus its key (delta
    modes key by the tensor's position i); the tag is counted apart."""
    total = 0
    for i, (name, shape) in enumerate(shapes.items()):
        n = math.prod(shape)
        k = math.ceil(round(fraction * n, 6)) if n else 0
        mask = -(-n // 8)
        index, suffix = (4 * k, "::idx") if 4 * k <= mask else (mask, "::mask")
        total += {
            "fp32": 4 * n + NPY_HEADER + len(name),
            "fp16": 2 * n + NPY_HEADER + len(name),
            "bf16": 2 * n + len(name),
            "int8": n + 4 * -(-n // block) + len(f"{i}::q{i}::scale"),
            "topk": index + 4 * k + len(f"{i}{suffix}{i}::val"),
            "topk-int8": index + k + 4 * -(-k // block) + len(f"{i}{suffix}{i}::q{i}::scale"),
        }[mode]
    return total


@pytest.mark.parametrize("fraction", [0.1, 0.01])
@pytest.mark.parametrize("mode", MODES)
def test_count_bytes_matches_the_hand_formula(mode, fraction):
    ref = random_state(SHAPES, 10)
    tensors = {n: t + torch.randn_like(t) for n, t in ref.items()}
    record, _ = encode(tensors, Codec(mode, topk_fraction=fraction), ref)
    tag = 0
    if mode in ("int8", "topk", "topk-int8"):  # mode, block and shapes, as compact JSON
        shapes = {n: list(s) for n, s in SHAPES.items()}
        text = json.dumps({"mode": mode, "block": 128, "shapes": shapes}, separators=(",", ":"))
        assert record[TAG].data == text.encode()
        tag = len(TAG) + len(text)
    unpacked = sum(len(payload(a)) + len(key) for key, a in record.items())
    assert unpacked == expected_bytes(mode, SHAPES, fraction) + tag
    saved = 0
    for a in record.values():  # a packed Array is zlib's bytes, and smaller
        if a.stype == PACKED:
            assert a.data == zlib.compress(payload(a), 1) and len(a.data) < len(payload(a))
            saved += len(payload(a)) - len(a.data)
    assert record.count_bytes() == unpacked - saved
    if mode == "topk-int8" and fraction == 0.1:
        assert saved > 0  # the 10 % mask of 6400 entries packs


def test_sparse_selections_send_indices_dense_ones_a_bitmask():
    ref = random_state({"w": (64, 100)}, 11)
    tensors = {"w": ref["w"] + torch.randn(64, 100)}
    sparse, _ = encode(tensors, Codec("topk", topk_fraction=0.01), ref)
    dense, _ = encode(tensors, Codec("topk", topk_fraction=0.1), ref)
    assert len(sparse["0::idx"].data) == 64 * 4 and len(sparse["0::val"].data) == 64 * 4
    assert "0::mask" not in sparse and "0::idx" not in dense
    assert len(payload(dense["0::mask"])) == 6400 // 8


def test_compression_ratios_on_a_large_tensor():
    ref = random_state({"w": (1000, 1000)}, 12)
    tensors = {"w": ref["w"] + 0.01 * torch.randn(1000, 1000)}
    size = {m: encode(tensors, Codec(m, topk_fraction=0.1), ref)[0].count_bytes() for m in MODES}
    ratio = {m: size["fp32"] / size[m] for m in MODES}
    assert 1.99 < ratio["fp16"] <= 2.0 and 2.0 <= ratio["bf16"] < 2.01
    # int8: 1 byte a value + 4 bytes a block of 128 (3.88x), a little less once zlib-packed
    assert 3.88 < ratio["int8"] < 4.2
    # 10 %: 4 value bytes + a 1.25-byte mask per sent value, the mask packed to ~0.58
    assert 8.0 < ratio["topk"] < 8.9
    # 1 byte of int8 per sent value (packed to ~0.86) + the packed mask: past 20x
    assert 20 < ratio["topk-int8"] < 28


def test_residual_round_trips_exactly_through_context_state():
    shapes = {"w": (50, 20), "s": ()}
    ref = random_state(shapes, 13)
    tensors = {n: t + torch.randn_like(t) for n, t in ref.items()}
    _, residual = encode(tensors, Codec("topk-int8"), ref)
    state = RecordDict({"compress.residual": residual_record(residual)})
    back = residual_from_record(over_the_wire(state["compress.residual"]))
    assert list(back) == list(residual)
    for name, t in residual.items():
        assert back[name].dtype == torch.float32 and torch.equal(back[name], t)


@pytest.mark.parametrize("mode", ["int8", "topk", "topk-int8"])
def test_delta_modes_need_a_matching_reference(mode):
    ref = random_state({"w": (4, 5), "b": (5,)}, 14)
    with pytest.raises(ModelError, match="none was given"):
        encode(ref, Codec(mode))
    record, _ = encode(ref, Codec(mode), ref)
    with pytest.raises(ModelError, match="none was given"):
        decode(record)
    with pytest.raises(ModelError, match=r"1 with another shape \(e.g. \['w: \(5, 4\) vs"):
        decode(record, {"w": torch.zeros(5, 4), "b": torch.zeros(5)})
    with pytest.raises(ModelError, match="1 missing"):
        encode(ref, Codec(mode), {"w": ref["w"]})
    with pytest.raises(ModelError, match="the residual does not match"):
        encode(ref, Codec(mode), ref, {"w": torch.zeros(4, 5)})


def test_bad_codec_names_every_problem():
    with pytest.raises(ConfigError) as caught:
        Codec("int4", topk_fraction=0, block=32)
    assert len(caught.value.problems) == 3
    assert "int4" in str(caught.value) and "64..256" in str(caught.value)


def test_unknown_array_kind_is_a_clear_error():
    record = ArrayRecord({"w": Array(dtype="int4", shape=(2,), stype="other", data=b"\x00")})
    with pytest.raises(ModelError, match="'w' is int4/other"):
        decode(record)


def lora_like(n_layers: int = 6) -> ArrayRecord:
    """Many small tensors (LoRA A and B) and one large one (a fully trained head)."""
    state = random_state(
        {f"l{i}.{m}.lora_{ab}": (4, 32) for i in range(n_layers) for m in "qv" for ab in "AB"},
        seed=3,
    )
    state["head"] = torch.randn(300, 1000)  # 1.2 MB of fp32: over BUNDLE_MAX_BYTES
    return ArrayRecord(state)


@pytest.mark.parametrize("mode", MODES)
def test_bundle_sends_the_small_arrays_as_one_and_restores_the_record_exactly(mode):
    """Flower moves every Array as objects of their own, one request each per hop: the small
    ones travel as one Array; the large one on its own, untouched (never copied)."""
    plain = lora_like()
    record, _ = encode(
        {k: torch.from_numpy(a.numpy()) for k, a in plain.items()},
        Codec(mode),
        reference={k: torch.zeros(a.shape) for k, a in plain.items()},
    )
    wire = bundle(record)
    small = [k for k, a in record.items() if len(a.data) < BUNDLE_MAX_BYTES]
    assert len(small) > 2 and len(wire) == 1 + len(record) - len(small)
    assert set(wire.keys()) - {BUNDLE} == set(record.keys()) - set(small)
    assert all(wire[k] is record[k] for k in record.keys() if k not in small)
    restored = unbundle(over_the_wire(wire))  # through Flower's own serialization
    assert list(restored.keys()) == list(record.keys())  # order kept, TAG first
    for k in record.keys():
        a, b = record[k], restored[k]
        assert (a.dtype, tuple(a.shape), a.stype, a.data) == (
            b.dtype,
            tuple(b.shape),
            b.stype,
            b.data,
        )
    # the bytes that travel: the data once, and a packed index no larger than the keys
    data = sum(len(a.data) for a in record.values())
    assert data < wire.count_bytes() <= record.count_bytes()


def test_a_record_without_two_small_arrays_travels_as_it_is():
    one = ArrayRecord({"w": torch.randn(3)})
    assert bundle(one) is one and unbundle(one) is one


@pytest.mark.parametrize(
    "break_it",
    [
        lambda d: d[:-3],  # truncated
        lambda d: d + b"xx",  # bytes left over
        lambda d: (10**6).to_bytes(8, "little") + d[8:],  # index length beyond the data
        lambda d: d[:8] + b"{" + d[9:],  # index that is not zlib's
    ],
    ids=["truncated", "left-over", "index-length", "index-zlib"],
)
def test_a_bundle_that_does_not_add_up_is_one_clear_error(break_it):
    """A hostile or broken client's bundle: a ModelError (the server rejects the reply),
    never a partial record."""
    wire = bundle(lora_like(2))
    data = break_it(wire[BUNDLE].data)
    wire[BUNDLE] = Array(dtype="bundle", shape=(len(data),), stype="fedtune.raw", data=data)
    with pytest.raises(ModelError, match="bundle"):
        unbundle(wire)


def test_a_bundle_missing_an_array_it_lists_is_an_error():
    wire = bundle(lora_like(2))
    del wire["head"]
    with pytest.raises(ModelError, match="bundle"):
        unbundle(wire)
