"""Checks that span several keys, and the few rules derived from a config.

Why apart from parsing: types, choices and ranges come from the schema itself (`parse.py`);
what is left here is what one key cannot know alone (min_clients against the sample size,
float16 with full fine-tuning, a strategy's own constructor arguments) and the derived
rules every layer must agree on (headline metric, clients per round).
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import string

from fedtune.config.parse import in_range
from fedtune.config.schema import (
    CLASSIFICATION_TASKS,
    FIXED_ARMS,
    STRATEGIES,
    Config,
    EarlyStoppingConfig,
    StrategyConfig,
)
from fedtune.config.sources import check_sources
from fedtune.metrics import ROUGE_KEYS

LOWER_IS_BETTER = ("eval_loss", "eval_ppl")


def headline_metric(cfg: Config) -> str:
    """The metric that picks the best round everywhere (summary, checkpoints/best, early
    stopping, compare): `eval.metric`, else the task's own."""
    if cfg.eval.metric:
        return cfg.eval.metric
    return "eval_accuracy" if cfg.task.type in CLASSIFICATION_TASKS else "eval_loss"


def task_metrics(cfg: Config) -> list[str]:
    """The centralized metrics this run's evaluation writes (evaluate.py, mmlu.py)."""
    kind = cfg.task.type
    names = ["eval_loss"]
    if kind in ("causal-lm", "instruction"):
        names.append("eval_ppl")
    if kind in CLASSIFICATION_TASKS:
        names += ["eval_accuracy", "eval_f1_macro", "eval_mcc"]
    if kind == "prompt-classification" and cfg.eval.generate:
        names += ["eval_gen_accuracy"] + [f"eval_{k}" for k in ROUGE_KEYS]
    if "mmlu" in cfg.eval.suites:
        names.append("eval_mmlu_accuracy")
    return names


def _check_metric(key: str, metric: str, cfg: Config) -> list[str]:
    """A metric name the run will actually produce (else one line, with a guess)."""
    known = task_metrics(cfg)
    if not metric or metric in known:
        return []
    close = difflib.get_close_matches(metric, known, n=1, cutoff=0.6)
    guess = f"did you mean {close[0]!r}? " if close else ""
    return [
        f"`{key}` = {metric!r}: a {cfg.task.type} run does not produce it; {guess}"
        f"this run's metrics: {', '.join(known)}"
    ]


def clients_per_round(cfg: Config) -> int:
    """How many clients Flower samples per round: int(n * fraction), at least 1."""
    return max(1, int(cfg.federation.num_clients * cfg.federation.fraction))


def metric_mode(metric: str) -> str:
    """`min` for losses and perplexity, `max` for accuracy-like metrics."""
    return "min" if metric in LOWER_IS_BETTER or metric.endswith("loss") else "max"


def strategy_class(name: str):
    from flwr.serverapp import strategy as S  # Flower only when a strategy is checked

    return {
        "fedavg": S.FedAvg,
        "fedavgm": S.FedAvgM,
        "fedprox": S.FedProx,
        "fedadam": S.FedAdam,
        "fedyogi": S.FedYogi,
        "fedadagrad": S.FedAdagrad,
        "fedmedian": S.FedMedian,
        "fedtrimmedavg": S.FedTrimmedAvg,
        "krum": S.Krum,
        "multikrum": S.MultiKrum,
        "bulyan": S.Bulyan,
    }[name]


# Byzantine-robust aggregators: they need every reply at once (no running mean).
ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")


# Set by fedtune from the federation section; a recipe must not set them in params.
MANAGED_STRATEGY_ARGS = (
    "fraction_train",
    "fraction_evaluate",
    "min_train_nodes",
    "min_evaluate_nodes",
    "min_available_nodes",
    "weighted_by_key",
    "arrayrecord_key",
    "configrecord_key",
    "train_metrics_aggr_fn",
    "evaluate_metrics_aggr_fn",
)

# Ranges of the Flower strategies' own arguments, in the schema's range notation.
STRATEGY_RANGES = {
    "proximal_mu": ">= 0",  # FedProx: 0 is FedAvg's client
    "server_momentum": "[0, 1)",  # FedAvgM
    "server_learning_rate": "> 0",
    "eta": "> 0",  # FedAdam / FedYogi / FedAdagrad
    "eta_l": "> 0",
    "beta_1": "[0, 1)",
    "beta_2": "[0, 1)",
    "tau": "> 0",
    "beta": "[0, 0.5)",  # FedTrimmedAvg: the share cut from each end
    "num_malicious_nodes": ">= 0",  # Krum, MultiKrum, Bulyan
    "num_nodes_to_select": "> 0",  # MultiKrum
}


def _check_robust(cfg: Config) -> list[str]:
    """What Krum and Bulyan need of the number of replies, checked against the sample."""
    s, n = cfg.strategy, clients_per_round(cfg)
    f, p = s.params.get("num_malicious_nodes", 0), []
    if not isinstance(f, int) or isinstance(f, bool):
        return p  # reported by _check_strategy
    # Krum's guarantee needs n > 2f + 2 (with f = 0 it still picks one reply); Flower's
    # Bulyan skips the round below 4f + 3 replies
    krum = 2 * f + 3 if f else 0
    need = {"krum": krum, "multikrum": krum, "bulyan": 4 * f + 3}.get(s.name, 0)
    if n < need:
        rule = "4 f + 3" if s.name == "bulyan" else "2 f + 3"
        p.append(
            f"strategy {s.name} with num_malicious_nodes f = {f} needs at least {rule} = "
            f"{need} replies per round, but only {n} clients are sampled (num_clients x "
            "fraction); lower f or sample more clients"
        )
    select = s.params.get("num_nodes_to_select", 1)
    if s.name == "multikrum" and isinstance(select, int) and select > n - f:
        p.append(
            f"`strategy.params.num_nodes_to_select` = {select} exceeds the {n - f} honest "
            f"replies MultiKrum can pick from ({n} sampled - {f} malicious)"
        )
    if cfg.federation.min_clients < need:
        p.append(
            f"`federation.min_clients` = {cfg.federation.min_clients} lets a round aggregate "
            f"fewer replies than {s.name} needs ({need}); set it to at least {need}"
        )
    return p


def _check_privacy(cfg: Config) -> list[str]:
    """What differential privacy needs of the rest of the run."""
    dp, p = cfg.privacy.dp, []
    if not dp.mode:
        return p
    if cfg.comm.uplink != "fp32" or cfg.comm.downlink != "fp32":
        p.append(
            f"`privacy.dp.mode = {dp.mode!r}` clips and noises the weights as they travel, "
            f"which the compressed `comm.uplink = {cfg.comm.uplink!r}` / `comm.downlink = "
            f"{cfg.comm.downlink!r}` replace; set both to fp32"
        )
    if dp.mode != "local" and cfg.strategy.name in ROBUST_STRATEGIES:
        p.append(
            f"central DP calibrates its noise to a mean of clipped updates; strategy "
            f"{cfg.strategy.name} does not average: use fedavg (or fedavgm, fedprox, fedadam, "
            '...) with `privacy.dp`, or `privacy.dp.mode = "local"`'
        )
    if dp.mode == "central-adaptive":
        stddev = dp.clipped_count_stddev or clients_per_round(cfg) / 20
        if dp.noise_multiplier >= 2 * stddev:
            p.append(
                f"central-adaptive with `privacy.dp.noise_multiplier` = {dp.noise_multiplier} "
                f"needs `privacy.dp.clipped_count_stddev` above {dp.noise_multiplier / 2:g} "
                f"(now {stddev:g}{'' if dp.clipped_count_stddev else ': clients per round / 20'}"
                "): the clipped-count query spends privacy too; raise it or lower the noise"
            )
    return p


def _check_strategy(cfg: StrategyConfig) -> list[str]:
    problems = []
    sig = inspect.signature(strategy_class(cfg.name).__init__).parameters
    for key, value in cfg.params.items():
        if key in MANAGED_STRATEGY_ARGS:
            problems.append(f"`strategy.params.{key}` is set by fedtune from [federation]")
        elif key not in sig:
            usable = [k for k in sig if k not in MANAGED_STRATEGY_ARGS + ("self",)]
            problems.append(
                f"unknown key `strategy.params.{key}` for {cfg.name}; "
                + (f"known: {', '.join(usable)}" if usable else f"{cfg.name} takes no parameters")
            )
        elif isinstance(sig[key].default, (int, float)) and not isinstance(sig[key].default, bool):
            rng = STRATEGY_RANGES.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                problems.append(f"`strategy.params.{key}` must be a number, got {value!r}")
            elif rng and not in_range(value, rng):
                text = rng if rng.startswith(">") else f"in {rng}"
                problems.append(
                    f"`strategy.params.{key}` = {value!r} must be {text} for {cfg.name}"
                )
    return problems


def config_warnings(cfg: Config) -> list[str]:
    """Valid but probably not what the user wants; printed, never fatal."""
    out = []
    s = cfg.strategy
    if s.name in ("fedadam", "fedyogi", "fedadagrad") and "eta" not in s.params:
        out.append(
            f"strategy {s.name} keeps Flower's default server step eta = 0.1, large "
            f"for {'LoRA tensors' if cfg.model.finetune == 'lora' else 'model weights'}"
            " (each entry may move by ~eta per round); set e.g. "
            "`strategy.params.eta = 1e-3`"
        )
    if cfg.train.precision == "bf16" and not _native_bf16_here():
        out.append(
            '`train.precision = "bf16"`: this machine has no CUDA GPU and its CPU no native '
            "bf16 (AVX512-BF16/AMX), so every bf16 matmul is emulated (~50-190x slower than "
            'fp32 here); use "auto" (bf16 only where it is native) or "fp32"'
        )
    return out


def _native_bf16_here() -> bool:
    import torch  # only when a recipe asks for bf16

    if torch.cuda.is_available():
        return True
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def _check_early_stopping(es: EarlyStoppingConfig, headline: str) -> list[str]:
    p = []
    if not es.patience and (es.metric or es.min_delta):
        p.append("`train.early_stopping` needs `patience` (rounds without improvement)")
    if es.metric and not es.metric.startswith("eval_"):
        p.append(
            f"`train.early_stopping.metric` = {es.metric!r}: early stopping watches the "
            "centralized evaluation, so the metric must start with eval_"
        )
    elif es.metric and es.metric != headline:
        p.append(
            f"`train.early_stopping.metric` = {es.metric!r} differs from the run's "
            f"headline metric {headline!r}: the best round, checkpoints/best and early "
            "stopping use one metric; set `eval.metric` instead"
        )
    return p


def _check_task(cfg: Config) -> list[str]:
    """Task keys that must agree with each other (columns are checked against the data)."""
    t, p = cfg.task, []
    if t.type in CLASSIFICATION_TASKS:
        if len(t.label_names) < 2 or not all(t.label_names):
            p.append(
                f"`task.label_names` must list >= 2 label names for {t.type}, got {t.label_names!r}"
            )
        elif len(set(t.label_names)) != len(t.label_names):
            p.append(f"`task.label_names` has duplicates: {t.label_names!r}")
    if t.type == "prompt-classification":
        if not t.prompt:
            p.append(
                "`task.prompt` is empty: prompt-classification needs a prompt with "
                '{column} fields, e.g. "Sentence: {sentence}\\nSentiment:"'
            )
        else:
            try:
                list(string.Formatter().parse(t.prompt))
            except ValueError as err:
                p.append(f"`task.prompt` is not a valid format string: {err}")
    if t.type == "sequence-classification" and not (
        1 <= len(t.text_columns) <= 2 and all(t.text_columns)
    ):
        p.append(f"`task.text_columns` must name 1 or 2 columns, got {t.text_columns!r}")
    if cfg.eval.suites and t.type == "sequence-classification":
        p.append("`eval.suites` (MMLU) needs a causal LM; this run is sequence-classification")
    return p


def _check_kd_and_compare(cfg: Config) -> list[str]:
    k, c, d, p = cfg.kd, cfg.compare, cfg.data, []
    if k.enabled and k.teacher_data_pct == 0:
        p.append(
            "`kd.enabled` needs `kd.teacher_data_pct` > 0: the teacher trains on that public slice"
        )
    for arm, items in c.overrides.items():
        if arm not in FIXED_ARMS and arm not in STRATEGIES:
            p.append(f"`compare.overrides`: unknown arm {arm!r}")
        elif not isinstance(items, list) or not all(isinstance(x, str) and "=" in x for x in items):
            p.append(f'`compare.overrides.{arm}` must be a list of "section.key=value"')
    if c.metric and not c.metric.startswith("eval_"):
        p.append(f"`compare.metric` = {c.metric!r} must be a centralized metric (eval_...)")
    if d.merge_partitions:
        n = d.split_clients
        if n < 1:
            p.append(
                "`data.merge_partitions` needs `data.split_clients` (how many ways the "
                "data is split)"
            )
        elif not all(0 <= i < n for i in d.merge_partitions):
            p.append(f"`data.merge_partitions` ids must be in 0..{n - 1}: {d.merge_partitions}")
        if cfg.federation.num_clients != 1:
            p.append("`data.merge_partitions` trains one client: set `federation.num_clients = 1`")
    return p


def _check_data(cfg: Config) -> list[str]:
    d, p = cfg.data, []
    if d.partitioner == "fixed-size" and d.samples_per_client <= 0:
        p.append('`data.partitioner = "fixed-size"` needs `data.samples_per_client` > 0')
    if d.partitioner in ("dirichlet", "shards", "natural") and not (
        d.partition_by or cfg.task.type in CLASSIFICATION_TASKS
    ):
        p.append(
            f'`data.partitioner = "{d.partitioner}"` needs `data.partition_by` (a '
            "label or grouping column)"
        )
    if d.partitioner == "iid" and d.samples_per_client:
        p.append('`data.samples_per_client` only applies to `data.partitioner = "fixed-size"`')
    if not cfg.lora.target_modules:
        p.append("`lora.target_modules` must be a non-empty list of module names")
    return p + _check_lora_aggregation(cfg)


def _check_lora_aggregation(cfg: Config) -> list[str]:
    mode, p = cfg.lora.aggregation, []
    if mode != "naive" and cfg.model.finetune != "lora":
        p.append(f'`lora.aggregation = "{mode}"` needs `model.finetune = "lora"`')
    if mode == "rolora" and cfg.comm.uplink in ("int8", "topk", "topk-int8"):
        p.append(
            f'`lora.aggregation = "rolora"` sends one factor a round, which a delta uplink '
            f'(`comm.uplink = "{cfg.comm.uplink}"`) cannot follow yet: use fp32, fp16 or bf16'
        )
    if mode in ("fedex", "svd") and cfg.strategy.name not in ("fedavg", "fedprox"):
        p.append(
            f'`lora.aggregation = "{mode}"` works on a plain weighted mean: use strategy fedavg '
            f'or fedprox, not "{cfg.strategy.name}"'
        )
    deltas = {cfg.comm.uplink, cfg.comm.downlink} & {"int8", "topk", "topk-int8"}
    if mode == "fedex" and deltas:
        p.append(
            f'`lora.aggregation = "fedex"` needs the exact factors clients trained: '
            f"`comm` {sorted(deltas)[0]} cannot carry them yet; use fp32, fp16 or bf16"
        )
    codecs = {cfg.comm.uplink, cfg.comm.downlink} - {"fp32"}
    if mode == "svd" and codecs:
        p.append(
            '`lora.aggregation = "svd"` sends each client its own rank\'s factors, which `comm` '
            f'"{sorted(codecs)[0]}" cannot encode yet: use comm.uplink = comm.downlink = "fp32"'
        )
    ranks = cfg.lora.client_ranks
    if ranks and mode != "svd":
        p.append('`lora.client_ranks` needs `lora.aggregation = "svd"` (or leave it empty)')
    if any(r < 1 for r in ranks):
        p.append(f"`lora.client_ranks` must be positive ranks, got {ranks}")
    if mode in ("rolora", "fedex", "svd") and cfg.privacy.dp.mode:
        p.append(
            f'`lora.aggregation = "{mode}"` with `privacy.dp` is not supported yet '
            "(Flower's DP clips and noises the whole reply): use naive or ffa"
        )
    return p


def _check_training(cfg: Config) -> list[str]:
    m, t, fed, p = cfg.model, cfg.train, cfg.federation, []
    if t.local_steps == 0 and t.local_epochs == 0:
        p.append("set `train.local_steps` or `train.local_epochs` above 0")
    if t.lr_min > t.lr:
        p.append(f"`train.lr_min` ({t.lr_min}) must not exceed `train.lr` ({t.lr})")
    if m.quantization and m.finetune != "lora":
        p.append(
            f'`model.quantization = "{m.quantization}"` needs `model.finetune = '
            '"lora"` (quantized base weights cannot train)'
        )
    if m.dtype == "float16" and (
        m.finetune == "full" or cfg.task.type == "sequence-classification"
    ):
        what = (
            "full fine-tuning"
            if m.finetune == "full"
            else "the classifier head of sequence-classification"
        )
        p.append(
            f'`model.dtype = "float16"` with {what} trains float16 weights, which '
            "AdamW turns into NaN after one step (its eps 1e-8 is 0 in float16); use "
            '`model.dtype = "bfloat16"`, or float32 weights with '
            '`train.precision = "bf16"` (autocast)'
        )
    p += _check_robust(cfg) + _check_privacy(cfg)
    if fed.min_clients > clients_per_round(cfg):
        p.append(
            f"`federation.min_clients` = {fed.min_clients} can never be met: only "
            f"{clients_per_round(cfg)} clients are sampled per round (num_clients x "
            "fraction); lower it or raise `federation.fraction`"
        )
    return p


def validate(cfg: Config, check_paths: bool = True, failed: frozenset = frozenset()) -> list[str]:
    """Cross-field rules, optional packages and (optionally) that local paths and offline
    assets exist. `failed`: keys that did not parse (their checks would judge a default)."""
    p = _check_task(cfg) + _check_data(cfg) + _check_training(cfg) + _check_kd_and_compare(cfg)
    if "strategy.name" not in failed:
        p += _check_strategy(cfg.strategy)
    metric_problems = [
        line
        for key, metric in (
            ("eval.metric", cfg.eval.metric),
            ("compare.metric", cfg.compare.metric),
            ("train.early_stopping.metric", cfg.train.early_stopping.metric),
        )
        for line in _check_metric(key, metric, cfg)
    ]
    p += metric_problems
    if not metric_problems:  # else the headline is the unknown name, reported already
        p += _check_early_stopping(cfg.train.early_stopping, headline_metric(cfg))
    o = cfg.output
    for key, wanted in [
        ("output.tensorboard", ["tensorboard"] if o.tensorboard else []),
        ("output.trackers", o.trackers),
    ]:
        for pkg in wanted:
            if importlib.util.find_spec(pkg) is None:
                p.append(
                    f"`{key}` needs the `{pkg}` package, which is not installed "
                    f"(pip install {pkg}); fedtune does not depend on it"
                )
    if cfg.eval.metric and not cfg.eval.metric.startswith("eval_"):
        p.append(
            f"`eval.metric` = {cfg.eval.metric!r} must name a centralized metric "
            "(eval_loss, eval_accuracy, ...)"
        )
    if check_paths:
        p += check_sources(cfg)
    return p
