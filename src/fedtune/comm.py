"""What travels between server and clients, in both directions (`comm.uplink`/`downlink`).

Why these references: a delta codec (int8, topk) needs weights both sides already hold.
- Downlink: the global model's difference from the shared initial weights, which every
  client rebuilds itself (the same seeded model), so a client that missed rounds, or a fresh
  deployment process, needs nothing else. Each round re-sends the whole difference, so
  nothing accumulates and no error feedback is needed.
- Uplink: the client's update against the global weights it decoded this round (the server
  decodes the same record, so both hold that `view`), with error feedback: what was not
  sent is kept in the client's `context.state` and added to its next update.
With a lossy downlink the server adds (global - view) back to the clients' mean, so the
global model never absorbs the downlink's rounding: FedAvg is global + mean of the updates.
"""

from __future__ import annotations

from flwr.app import Context

from fedtune import compress
from fedtune.config import Config

RESIDUAL_KEY = "fedtune.comm-residual"  # the client's unsent update, in context.state


def codec(cfg: Config, direction: str) -> compress.Codec:
    return codec_of(cfg.comm.uplink if direction == "up" else cfg.comm.downlink, cfg)


def codec_of(mode: str, cfg: Config) -> compress.Codec:
    return compress.Codec(mode, cfg.comm.topk_fraction, cfg.comm.block)


def needs_initial(cfg: Config) -> bool:
    """Whether both sides keep a copy of the initial trainable weights (delta downlink)."""
    return cfg.comm.downlink in compress.DELTA_MODES


class ServerChannel:
    """The server's side: encode the global model once per round and decode replies."""

    def __init__(self, cfg: Config, initial: dict | None):
        self.up, self.down, self.initial = codec(cfg, "up"), codec(cfg, "down"), initial
        self.view, self.correction = None, None

    @property
    def plain(self) -> bool:
        return self.up.mode == "fp32" and self.down.mode == "fp32"

    def downlink(self, global_state: dict):
        """The record every sampled client receives; remembers what they will decode."""
        record, _ = compress.encode(global_state, self.down, reference=self.initial)
        self.view = compress.decode(record, reference=self.initial)
        lossless = self.down.mode == "fp32"
        self.correction = (
            None if lossless else {k: global_state[k].float() - v for k, v in self.view.items()}
        )
        return record

    def decode_reply(self, record) -> dict:
        """A reply's weights as the client trained them (float32 tensors)."""
        return compress.decode(record, reference=self.view)


def client_receive(record, initial: dict | None) -> dict:
    """The global weights a client trains from (float32 tensors)."""
    return compress.decode(record, reference=initial)


def client_reply(cfg: Config, state: dict, received: dict, context: Context):
    """The reply's ArrayRecord; a delta uplink's unsent remainder goes to context.state."""
    residual = None
    if RESIDUAL_KEY in context.state:
        residual = compress.residual_from_record(context.state[RESIDUAL_KEY])
    record, residual = compress.encode(state, codec(cfg, "up"), received, residual)
    if residual is not None:
        context.state[RESIDUAL_KEY] = compress.residual_record(residual)
    return record
