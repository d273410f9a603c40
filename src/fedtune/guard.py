"""Screening of each client reply before it can reach the global model.

Why: a federation's members crash, run buggy code or lie. One NaN, a tensor of the wrong
shape or an update scaled x100 averaged into the global model ruins every later round, and
a made-up example count lets one client outweigh the rest. Every reply is checked against
the weights the client was sent, tensor by tensor (a reply is never copied in full), and a
rejected reply counts as a failed client: `federation.min_clients` applies to what is left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord

from fedtune.aggregation import WEIGHT_KEY, tensors
from fedtune.config import RobustConfig

REPLY_METRICS = (WEIGHT_KEY, "partition_id")  # what the server reads from every reply


@dataclass(frozen=True)
class Verdict:
    reason: str | None  # why the reply is rejected; None = accepted
    norm: float = math.nan  # L2 norm of the update (weights - the weights sent)
    scale: float = 1.0  # factor `robust.clip_update_norm` applies to the update


def malformed(content) -> str | None:
    """Why a reply's records cannot be read (None if they can): the arrays, and a finite
    positive example count, which weighs the reply in every mean."""
    if "arrays" not in content.array_records:
        return "malformed reply: no `arrays` record"
    metrics = content.metric_records.get("metrics")
    missing = [k for k in REPLY_METRICS if metrics is None or k not in metrics]
    if missing:
        return f"malformed reply: metrics lack {', '.join(missing)}"
    weight = metrics[WEIGHT_KEY]
    if isinstance(weight, list) or not math.isfinite(weight) or weight <= 0:
        return f"malformed reply: {WEIGHT_KEY} = {weight!r} is not a positive number"
    return None


def screen(
    arrays: ArrayRecord | dict[str, torch.Tensor],
    sent: dict[str, torch.Tensor],
    spec: RobustConfig,
    wire_dtypes: dict[str, str] | None = None,
) -> Verdict:
    """Check a reply's tensors against `sent` (the weights its client started from): the
    same keys, shapes and (for Flower Arrays) `wire_dtypes`, only finite values, and an
    update norm within `robust.max_update_norm`; then the clipping factor."""
    missing, extra = sorted(sent.keys() - arrays.keys()), sorted(arrays.keys() - sent.keys())
    if missing or extra:
        return Verdict(
            f"keys: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(extra)} unexpected (e.g. {extra[:2]})"
        )
    for key, array in arrays.items():  # metadata first: nothing is deserialized yet
        shape = tuple(array.shape)
        if shape != tuple(sent[key].shape):
            return Verdict(f"shape of {key}: {shape}, expected {tuple(sent[key].shape)}")
        dtype = getattr(array, "dtype", None)
        if wire_dtypes and isinstance(dtype, str) and dtype != wire_dtypes[key]:
            return Verdict(f"dtype of {key}: {dtype}, expected {wire_dtypes[key]}")
    squares = 0.0
    for key, value in tensors(arrays):
        if not torch.isfinite(value).all():
            return Verdict(f"non-finite values (NaN/Inf) in {key}")
        diff = value.float() - sent[key].float()  # one tensor's temporary
        squares += float(torch.linalg.vector_norm(diff)) ** 2
    norm = math.sqrt(squares)
    if spec.max_update_norm and norm > spec.max_update_norm:
        return Verdict(
            f"update norm {norm:.4g} > robust.max_update_norm = {spec.max_update_norm:g}", norm
        )
    clip = spec.clip_update_norm
    return Verdict(None, norm, clip / norm if clip and norm > clip else 1.0)
