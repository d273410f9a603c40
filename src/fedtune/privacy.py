"""Differential privacy of what travels (`privacy.dp`): Flower's DP wrappers and mods, and
the privacy they spend, round by round.

Why Flower's: its strategy wrappers (`DifferentialPrivacyServerSide{Fixed,Adaptive}Clipping`,
`DifferentialPrivacyClientSideFixedClipping`) and client mods (`fixedclipping_mod`,
`LocalDpMod`) clip and noise as the papers do; fedtune only picks them from the config,
hands the wrappers every reply with EQUAL weights (their noise, z C / k, is calibrated to
an unweighted mean of k clipped updates: weighing by example count would let one client
move the mean by more than C / k) and keeps the account. The account is Flower's
`RdpAccountant` (Google's dp-accounting), fed here rather than by the wrapper because
the wrapper's own accounting allows neither sampling amplification nor a round where a
client failed.

What one round releases, with k clients sampled of N and n of them replying:
- central modes: the mean of n clipped updates + N(0, (z C / k)^2). Without replacement
  (Flower's sampling) neighbours replace one client: sensitivity 2 C / n, so the Gaussian's
  noise multiplier is z n / (2 k), amplified by sampling k of N. Poisson (McMahan et al.
  2018): add/remove one client, sensitivity C / n, multiplier z n / k at rate k / N.
- local: each client's update, clipped to C and noised by `LocalDpMod` with the Gaussian
  mechanism for (local_epsilon, local_delta) at sensitivity 2 C; over rounds the budgets
  add up (basic composition), which is what is reported.

The noise comes from numpy's global generator, which nothing in fedtune seeds: noise that
`train.seed` could replay would be noise every client could subtract.
"""

from __future__ import annotations

from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod
from flwr.serverapp import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig as AccountingConfig,
    RdpAccountant,
    SamplingMethod,
    strategy as S,
)

from fedtune import config as C
from fedtune.aggregation import DP_WRAPPERS

CENTRAL = ("central-fixed", "central-adaptive", "client-fixed")


def wrap(strategy, cfg: C.Config):
    """`strategy` inside the Flower DP wrapper `privacy.dp.mode` names (or unchanged)."""
    dp, k = cfg.privacy.dp, C.clients_per_round(cfg)
    if dp.mode == "central-fixed":
        return S.DifferentialPrivacyServerSideFixedClipping(
            strategy, dp.noise_multiplier, dp.clipping_norm, k
        )
    if dp.mode == "client-fixed":
        return S.DifferentialPrivacyClientSideFixedClipping(
            strategy, dp.noise_multiplier, dp.clipping_norm, k
        )
    if dp.mode == "central-adaptive":
        return S.DifferentialPrivacyServerSideAdaptiveClipping(
            strategy,
            dp.noise_multiplier,
            k,
            initial_clipping_norm=dp.clipping_norm,
            target_clipped_quantile=dp.target_clipped_quantile,
            clip_norm_lr=dp.clip_norm_lr,
            clipped_count_stddev=dp.clipped_count_stddev or None,
        )
    return strategy


def inner(strategy):
    """The strategy a DP wrapper wraps (the strategy itself otherwise)."""
    return strategy.strategy if isinstance(strategy, DP_WRAPPERS) else strategy


def client_mod(dp: C.DpConfig):
    """The Flower mod a client applies to its train replies (None: none)."""
    if dp.mode == "client-fixed":
        return fixedclipping_mod  # clips to the norm the server's wrapper sends
    if dp.mode == "local":
        return LocalDpMod(dp.clipping_norm, 2 * dp.clipping_norm, dp.local_epsilon, dp.local_delta)
    return None


class Ledger:
    """Privacy spent so far; its whole state derives from the metric rows (resume)."""

    def __init__(self, cfg: C.Config):
        self.dp, self.population = cfg.privacy.dp, cfg.federation.num_clients
        self.sampled = C.clients_per_round(cfg)
        self.releases, self.epsilon = 0, 0.0
        self.replace_one = self.dp.accounting == "without-replacement"
        self.accountant = None
        if self.dp.mode in CENTRAL:
            self.accountant = RdpAccountant(
                AccountingConfig(
                    target_delta=self.dp.delta,
                    population_size=self.population,
                    neighboring_relation=NeighboringRelation.REPLACE_ONE
                    if self.replace_one
                    else NeighboringRelation.ADD_OR_REMOVE_ONE,
                    sampling_method=SamplingMethod.WITHOUT_REPLACEMENT
                    if self.replace_one
                    else SamplingMethod.POISSON,
                )
            )

    def noise_multiplier(self, replied: int) -> float:
        """The Gaussian's noise multiplier relative to the round's sensitivity (above)."""
        z = self.dp.noise_multiplier * replied / self.sampled
        return z / 2 if self.replace_one else z

    def release(self, replied: int, clipping_norm: float | None = None) -> dict:
        """Account one round's release (`replied` clients in the mean); its row fields."""
        before = self.epsilon
        self.releases += 1
        row = {"dp_mode": self.dp.mode}
        if self.accountant is None:  # local: basic composition of the clients' budgets
            self.epsilon = self.releases * self.dp.local_epsilon
            delta = self.releases * self.dp.local_delta
        else:
            z = self.noise_multiplier(replied)
            self.accountant.compose(GaussianPrivacyEvent(z, self.sampled, self.population))
            self.epsilon, delta = self.accountant.get_privacy_spent().epsilon, self.dp.delta
            row |= {"dp_noise_multiplier": z, "dp_clients_in_mean": replied}
        return row | {
            "dp_clipping_norm": clipping_norm or self.dp.clipping_norm,
            "dp_epsilon": self.epsilon,
            "dp_epsilon_round": self.epsilon - before,
            "dp_delta": delta,
        }

    def summary(self) -> dict:
        """What summary.json says of the privacy spent by the whole run."""
        dp = self.dp
        central = self.accountant is not None
        return {
            "mode": dp.mode,
            "epsilon": self.epsilon,
            "delta": dp.delta if central else self.releases * dp.local_delta,
            "releases": self.releases,
            "accounting": f"RDP, {dp.accounting} sampling" if central else "basic composition",
            "clipping_norm": dp.clipping_norm,
            "noise_multiplier": dp.noise_multiplier if central else None,
            "local_epsilon": None if central else dp.local_epsilon,
        }

    def replay(self, row: dict) -> None:
        """Re-account a round read back from metrics.jsonl (`fedtune run --resume`)."""
        if "dp_epsilon" in row:
            self.release(int(row.get("dp_clients_in_mean", self.sampled)))
