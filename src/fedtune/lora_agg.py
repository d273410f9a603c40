"""What averaging LoRA factors does, and the ways to average what clients learned.

A LoRA layer adds s * B @ A to its frozen weight (s = alpha / r; (out, in) orientation, the
transpose for GPT-2's Conv1D, PEFT's `fan_in_fan_out`). Averaging A and B element-wise
(`naive`, what FlowerTune and most frameworks do) gives mean(B) @ mean(A), which is not the
mean of the clients' updates mean(B_i @ A_i). Here, on plain tensors keyed as PEFT names
parameters (`<module>.lora_A.<adapter>.weight`, `<module>.lora_B.<adapter>.weight`):

- `FactorStack` keeps the replies' weighted factors per layer: the exact mean update
  sum_i w_i s_i B_i @ A_i / sum_i w_i as a product of stacked factors (for `fedex`, `svd`
  and the error of `naive`), dense only where asked;
- `naive_error` is ||mean(s BA) - s mean(B) mean(A)|| / ||mean(s BA)|| over all layers;
- `residual` is what FedEx-LoRA folds into the frozen weights so the model is exact;
- `refactor` is FlexLoRA's truncated SVD of the mean update to any client's rank (`svd`:
  clients of different ranks, `lora.client_ranks`; the server keeps rank `lora.r`).
`ffa` and `rolora` need none of this: with one factor frozen and identical everywhere the
element-wise mean of the other is already exact.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord

from fedtune import compress
from fedtune.aggregation import tensors

A_PART, B_PART = ".lora_A.", ".lora_B."


@dataclass(frozen=True)
class Pair:
    """One adapted layer: its module path and the keys of its two factors."""

    module: str
    a: str
    b: str


def pairs(keys) -> list[Pair]:
    """Every lora_A key with its lora_B key, in key order; other keys (a classifier head
    PEFT trains along) belong to no pair. A factor without its partner is an error."""
    a_keys = {k.split(A_PART)[0]: k for k in keys if A_PART in k}
    b_keys = {k.split(B_PART)[0]: k for k in keys if B_PART in k}
    if a_keys.keys() != b_keys.keys():
        odd = sorted(a_keys.keys() ^ b_keys.keys())
        raise ValueError(f"LoRA factors without their partner: {odd[:3]}")
    return [Pair(m, a_keys[m], b_keys[m]) for m in sorted(a_keys)]


def delta(state: dict[str, torch.Tensor], pair: Pair, scaling: float) -> torch.Tensor:
    """s * B @ A in (out, in) orientation, float64: the update this layer adds."""
    return scaling * (state[pair.b].double() @ state[pair.a].double())


class FactorStack:
    """The accepted replies' factors per layer, weighted: B = [w_1 s_1 B_1, ..., w_N s_N B_N]
    / sum w and A = [A_1; ...; A_N], so B @ A is the exact mean update. Held as factors, N
    times the adapter (small), never as the dense (out, in) update unless asked: for a 7B
    model's q,v at r 16 that is 33 MB a client against 4.3 GB dense. Client ranks may
    differ (FlexLoRA), and so may their scalings."""

    def __init__(self):
        self.b: dict[str, list[torch.Tensor]] = {}
        self.a: dict[str, list[torch.Tensor]] = {}
        self.weights: list[float] = []

    def add(self, state: dict[str, torch.Tensor], weight: float, scaling: float) -> None:
        for pair in pairs(state.keys()):
            self.b.setdefault(pair.module, []).append(state[pair.b].double() * (weight * scaling))
            self.a.setdefault(pair.module, []).append(state[pair.a].double().clone())
        self.weights.append(weight)

    @property
    def weight(self) -> float:
        return sum(self.weights)

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) of `module`'s mean update: (out, R) and (R, in), R = sum of ranks."""
        return torch.cat(self.b[module], dim=1) / self.weight, torch.cat(self.a[module])

    def update(self, module: str) -> torch.Tensor:
        """The dense mean update of one layer, (out, in), float64."""
        b, a = self.factors(module)
        return b @ a


def _frob2(b: torch.Tensor, a: torch.Tensor) -> float:
    """||b @ a||_F^2 = trace((b^T b)(a a^T)), with matrices of the rank's size only."""
    return float(((b.T @ b) * (a @ a.T)).sum())


def naive_error(stack: FactorStack) -> float | None:
    """||mean(s B_i A_i) - mean(s B_i) mean(A_i)||_F / ||mean(s B_i A_i)||_F over all layers
    (weighted means): how far element-wise averaging lands from the mean of what clients
    learned. None where ranks differ (element-wise means are then undefined)."""
    num = den = 0.0
    w = torch.tensor(stack.weights, dtype=torch.float64) / stack.weight
    for module in stack.b:
        b, a = stack.factors(module)
        if len({t.shape for t in stack.a[module]}) > 1:
            return None
        b_bar = sum(stack.b[module]) / stack.weight  # already weighted by w_i s_i
        a_bar = sum(wi * ai for wi, ai in zip(w, stack.a[module], strict=True))
        num += _frob2(torch.cat([b, -b_bar], dim=1), torch.cat([a, a_bar]))
        den += _frob2(b, a)
    return max(num, 0.0) ** 0.5 / den**0.5 if den else 0.0


def residual(
    stack: FactorStack, mean_state: dict[str, torch.Tensor], scaling: float
) -> dict[str, torch.Tensor]:
    """FedEx-LoRA's correction per layer, (out, in): mean(s B_i A_i) - s mean(B) mean(A).
    Added to the frozen weight, the model with the averaged factors is the exact mean."""
    return {
        pair.module: stack.update(pair.module) - delta(mean_state, pair, scaling)
        for pair in pairs(mean_state.keys())
    }


def fold(weight: torch.Tensor, correction: torch.Tensor, fan_in_fan_out: bool) -> None:
    """Add a (out, in) correction to a frozen weight in place ((in, out) for Conv1D)."""
    with torch.no_grad():
        weight.add_((correction.T if fan_in_fan_out else correction).to(weight.dtype))


@dataclass(frozen=True)
class Factors:
    b: torch.Tensor  # (out, rank)
    a: torch.Tensor  # (rank, in)
    dropped: float  # share of the update's energy (sum of squared singular values) cut
    energy: float  # the update's energy, ||b @ a||_F^2


def refactor(b: torch.Tensor, a: torch.Tensor, rank: int, scaling: float) -> Factors:
    """B', A' of `rank` with scaling * B' @ A' = the best rank-`rank` approximation of the
    update b @ a (Eckart-Young: its truncated SVD), found from QR of the factors and the SVD
    of an R x R core (R = the stacked ranks), never the dense update. The singular values
    are split evenly between B' and A'; `scaling` (alpha / the receiving client's rank) is
    divided out once, as that client's LoRA layer multiplies it back in."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    if s.numel():  # directions ~1e-7 of the largest are rounding noise: exactly zero, so a
        s = torch.where(s > s[0] * 1e-7, s, 0.0)  # client restarts them (`revive`)
    k = min(rank, s.numel())
    root = (s[:k] / scaling).sqrt()
    new_b = torch.zeros(b.shape[0], rank, dtype=torch.float64)
    new_a = torch.zeros(rank, a.shape[1], dtype=torch.float64)
    new_b[:, :k] = (qb @ u[:, :k]) * root
    new_a[:k] = root[:, None] * (vh[:k] @ qa.T)
    energy = float(s.square().sum())
    dropped = float(s[k:].square().sum()) / energy if energy else 0.0
    return Factors(new_b.float(), new_a.float(), dropped, energy)


def refactor_all(factors_of, layers: list[Pair], rank: int, scaling: float):
    """(LoRA tensors of `rank` for every layer, the share of the energy dropped over all
    layers): `factors_of(module)` gives the (B, A) whose product is the update to keep."""
    out, cut, energy = {}, 0.0, 0.0
    for pair in layers:
        f = refactor(*factors_of(pair.module), rank, scaling)
        out[pair.a], out[pair.b] = f.a, f.b
        cut, energy = cut + f.dropped * f.energy, energy + f.energy
    return out, (cut / energy if energy else 0.0)


def client_rank(lora, pid: int | None) -> int:
    """`svd`: client `pid`'s LoRA rank (`lora.client_ranks` in turn by partition id); else,
    and for the server (pid None), `lora.r`."""
    ranks = lora.client_ranks if lora.aggregation == "svd" else []
    return ranks[pid % len(ranks)] if ranks and pid is not None else lora.r


def for_client(cfg, pid: int):
    """The config a client builds its model from: its own LoRA rank under `svd`."""
    rank = client_rank(cfg.lora, pid)
    return (
        cfg
        if rank == cfg.lora.r
        else dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, r=rank))
    )


def revive(model, received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`svd`, client side: rows of A that arrive as zeros (the global update has a lower rank
    than this client's adapter, as in round 1 where it is zero) restart from this model's
    seeded initial A. B's matching columns are zero, so the update is unchanged, but both
    can train again (with both zero, neither gets a gradient)."""
    init = getattr(model, "fedtune_lora_init", None)
    if init is None:  # the first message: the adapter is still as `add_lora` seeded it
        init = model.fedtune_lora_init = {
            n: p.detach().clone() for n, p in model.named_parameters() if A_PART in n
        }
    out = dict(received)
    for key, a in received.items():
        if A_PART in key:
            dead = a.abs().sum(dim=1) == 0
            out[key] = torch.where(dead[:, None], init[key].to(a.dtype), a)
    return out


def frozen_this_round(keys, mode: str, rnd: int) -> set[str]:
    """Keys that stay as the server sent them in round `rnd` (RoLoRA: A in odd rounds, B in
    even ones; PEFT starts B at zero, so B must train first or A gets no gradient). They
    do not travel back: the server fills them in from what it sent."""
    if mode != "rolora":
        return set()
    part = A_PART if rnd % 2 else B_PART
    return {k for k in keys if part in k}


class LoraRound:
    """What a round's `lora.aggregation` asks of the server: the keys frozen this round
    (clients must not send them; the server's copy fills in, bit for bit), the accepted
    replies' factors (for the error of element-wise averaging, FedEx's residual and the
    `svd` merge), and under `svd` each client's own downlink at its rank."""

    def __init__(self, lora, state: dict, rnd: int, fixed: dict | None = None):
        """`lora`: the run's LoraConfig; `state`: the trainable tensors the round sends;
        `fixed`: LoRA factors that never train (FFA-LoRA's A), needed only to measure."""
        self.lora, self.state, self.svd = lora, state, lora.aggregation == "svd"
        self.frozen = frozen_this_round(state, lora.aggregation, rnd)
        self.keep = {k: state[k].clone() for k in self.frozen}
        self.fixed = fixed or {}
        self.layers = pairs(state.keys() | self.fixed.keys())
        self.stack = FactorStack() if self.layers else None
        self.scaling = lora.alpha / lora.r
        self.downs: dict[int, dict] = {}  # svd: rank -> the LoRA tensors sent at that rank
        self.dropped: dict[str, float] = {}

    def downlink(self, pid: int | None) -> dict | None:
        """`svd`: the LoRA tensors client `pid` receives, the global update (rank <= lora.r)
        refactored to the client's rank; None where every client gets the same record."""
        if not self.svd:
            return None
        rank = client_rank(self.lora, pid)
        if rank not in self.downs:
            self.downs[rank], cut = refactor_all(
                self._global, self.layers, rank, self.lora.alpha / rank
            )
            self.dropped["lora_svd_dropped_down"] = max(
                cut, self.dropped.get("lora_svd_dropped_down", 0.0)
            )
        return self.downs[rank]

    def _global(self, module: str):
        pair = next(p for p in self.layers if p.module == module)
        return self.scaling * self.state[pair.b].double(), self.state[pair.a].double()

    def sent_to(self, pid: int | None, sent: dict) -> dict:
        """What client `pid` started from (under `svd`: its own rank's factors)."""
        down = self.downlink(pid)
        return sent if down is None else sent | down

    def expected(self, sent: dict) -> dict:
        """What a reply must hold: the sent tensors that train this round."""
        return {k: v for k, v in sent.items() if k not in self.frozen}

    def complete(self, arrays, sent: dict, weight: float, scale: float, pid: int | None):
        """The reply as the strategy should average it: frozen keys filled in, and under
        `svd` the LoRA factors (of the client's rank) replaced by the server's (they merge
        through the stack instead). Its factors, as clipped by `scale` against `sent`, join
        the stack."""
        if not self.frozen and self.stack is None:
            return arrays
        full = dict(tensors(arrays)) | {k: v.clone() for k, v in self.keep.items()}
        clipped = (
            full
            if scale == 1.0
            else {
                k: sent[k].double() + scale * (v.double() - sent[k].double())
                for k, v in full.items()
            }
        )
        self.stack.add(clipped | self.fixed, weight, self.lora.alpha / client_rank(self.lora, pid))
        if self.svd:
            full = dict(tensors(arrays)) | {p.a: self.state[p.a] for p in self.layers}
            return full | {p.b: self.state[p.b] for p in self.layers}
        return full if self.frozen else arrays

    def merged(self) -> dict:
        """`svd`: the server's new factors, rank lora.r, from the exact mean update."""
        if not self.svd or not self.stack.weights:
            return {}
        out, self.dropped["lora_svd_dropped"] = refactor_all(
            self.stack.factors, self.layers, self.lora.r, self.scaling
        )
        return out

    def metrics(self) -> dict:
        if self.stack is None or not self.stack.weights:
            return {}
        error = naive_error(self.stack)  # None where client ranks differ
        return self.dropped | ({"lora_naive_error": error} if error is not None else {})


def wire(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A tensor as `model.to_arrays` sends the model's: its dtype, bf16 as fp32."""
    return t.to(torch.float32 if dtype == torch.bfloat16 else dtype)


def downlink_records(lora: LoraRound, pids: list, shared):
    """The arrays record for each message's client: `shared` unless `svd` gives the client
    its own rank's factors (one record per rank, shared by the clients of that rank)."""
    by_rank: dict[int, ArrayRecord] = {}
    out = []
    for pid in pids:
        down = lora.downlink(pid)
        if down is None:
            out.append(shared)
            continue
        rank = client_rank(lora.lora, pid)
        if rank not in by_rank:
            sent = {k: wire(v, lora.state[k].dtype) for k, v in (lora.state | down).items()}
            by_rank[rank] = compress.bundle(ArrayRecord(sent))
        out.append(by_rank[rank])
    return out


def adapted_layers(model) -> dict[str, torch.nn.Module]:
    """PEFT's LoRA layers by module name (the names `pairs` gives): what FedEx corrects."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and n}


class FedEx:
    """FedEx-LoRA's correction on the server. Each round's residual joins a running total;
    every adapted layer's frozen weight becomes W0 + total. The total travels to clients
    every round (they may have missed rounds or be fresh processes), encoded by `codec`
    (fp32, or fp16/bf16 to halve its dense bytes), and the server applies the same decoded
    total, so both sides hold one model."""

    RECORD = "fedex"  # the train message's extra ArrayRecord

    def __init__(self, model, codec: compress.Codec):
        self.codec, self.record = codec, None
        self.total: dict[str, torch.Tensor] = {}
        self.base0 = base_weights(model)

    def add(self, stack: FactorStack, model, mean_state: dict, scaling: float) -> float:
        """Fold this round's residual in; returns its norm relative to the mean update."""
        fixes = residual(stack, mean_state, scaling)
        num = sum(float(f.square().sum()) for f in fixes.values())
        den = sum(float(stack.update(m).square().sum()) for m in fixes)
        for module, fix in fixes.items():
            self.total[module] = self.total.get(module, 0) + fix.float()
        self.restore(model, self.total)
        return (num / den) ** 0.5 if den else 0.0

    def restore(self, model, total: dict[str, torch.Tensor]) -> None:
        """Set the total (a checkpoint's, on resume) and apply it as clients will."""
        self.total = {m: t.float() for m, t in total.items()}
        if self.total:
            self.record, _ = compress.encode(self.total, self.codec)
            apply(model, compress.decode(self.record), self.base0)


def base_weights(model) -> dict[str, torch.Tensor]:
    """A copy of every adapted layer's frozen weight as loaded (W0)."""
    return {n: m.base_layer.weight.detach().clone() for n, m in adapted_layers(model).items()}


def apply(model, total: dict[str, torch.Tensor], base0: dict[str, torch.Tensor]) -> None:
    """Frozen weights := W0 + total ((out, in) corrections, transposed for Conv1D); layers
    without a correction go back to W0."""
    with torch.no_grad():
        for name, layer in adapted_layers(model).items():
            weight = layer.base_layer.weight
            weight.copy_(base0[name])
            if name in total:
                fix = total[name].to(weight.dtype)
                weight.add_(fix.T if layer.fan_in_fan_out else fix)


def receive_fedex(model, content) -> None:
    """Client side: frozen weights := W0 + the server's total when the message carries one;
    back to W0 when it carries none but this (cached) model was corrected before."""
    base0 = getattr(model, "fedtune_base0", None)
    if FedEx.RECORD in content.array_records:
        if base0 is None:
            base0 = model.fedtune_base0 = base_weights(model)
        apply(model, compress.decode(content[FedEx.RECORD]), base0)
    elif base0 is not None:
        apply(model, {}, base0)
