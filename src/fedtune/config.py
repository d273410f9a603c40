"""Typed, validated experiment config: one dataclass per recipe section.

Why: a typo in a recipe must fail in the first second with the key's name, not after a
model has loaded or in round 3. Every field carries its default and a help line, so the
defaults live in exactly one place; `--set section.key=value` overrides are coerced to the
field's type. All problems are reported together in one `ConfigError`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import tomllib
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from fedtune import assets
from fedtune.errors import ConfigError, FedtuneError


def _f(default, help: str):  # noqa: A002 - `help` reads best in the field lists below
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    name: str = _f("offline:smollm2-135m-instruct",
                   "hub id (facebook/opt-350m), local folder, or offline:NAME (packaged asset)")
    finetune: str = _f("lora", "`lora` (only adapter tensors train and travel) or `full`")
    dtype: str = _f("float32", "weight dtype: float32 | bfloat16 | float16")
    gradient_checkpointing: bool = _f(False, "trade compute for activation memory")
    quantization: str = _f("", "\"\" (none), \"4bit\" (QLoRA, NF4) or \"8bit\" base weights; "
                           "needs bitsandbytes and a CUDA GPU")


@dataclass
class LoraConfig:
    r: int = _f(8, "LoRA rank")
    alpha: int = _f(16, "LoRA scaling numerator (scale = alpha / r)")
    dropout: float = _f(0.05, "dropout on the LoRA input")
    target_modules: list = _f(["q_proj", "v_proj"],
                              "module names to adapt, or [\"all-linear\"]")


@dataclass
class DataConfig:
    source: str = _f("offline:python-stdlib",
                     "hub dataset id, local .jsonl/.json/.csv/.parquet/.txt file, a folder "
                     "of source files, or offline:NAME")
    subset: str = _f("", "hub dataset configuration name (load_dataset's second argument)")
    split: str = _f("train", "split to read from a hub dataset")
    text_column: str = _f("text", "column holding the text")
    file_glob: str = _f("**/*.py", "which files to read when `source` is a folder")
    max_samples: int = _f(0, "use only the first N samples after shuffling (0 = all)")
    test_samples: int = _f(64, "samples held out for the server's test split (never on clients)")
    partitioner: str = _f("iid", "iid | fixed-size | dirichlet (over `partition_by`) | "
                          "shards (k label shards per client) | natural (one group per client)")
    samples_per_client: int = _f(0, "samples per client for `fixed-size` (seed runs: 1000)")
    partition_by: str = _f("", "column the non-IID partitioners and the partition histogram "
                           "use (\"\" = the task's label column, if any)")
    dirichlet_alpha: float = _f(0.5, "Dirichlet concentration: small = skewed clients")
    shards_per_client: int = _f(2, "`shards`: label-sorted shards per client (k labels)")
    min_partition_size: int = _f(1, "`dirichlet`: resample until every client has this many")
    merge_partitions: list = _f([], "baselines: train ONE client on these partitions (ids of "
                                "the `split_clients`-way split) merged: all ids = centralized, "
                                "[i] = client i alone (local-only)")
    split_clients: int = _f(0, "with merge_partitions: how many ways the data is split")
    seq_len: int = _f(128, "tokens per packed training block")


@dataclass
class TaskConfig:
    type: str = _f("causal-lm", "causal-lm (packed text, loss on every token) | instruction "
                   "(prompt + response, loss on the response) | prompt-classification "
                   "(prompt + verbal label, loss on the label) | sequence-classification "
                   "(encoder + classifier head)")
    template: str = _f("alpaca", "instruction: `alpaca` (the Alpaca prompt) or `chat` (the "
                       "tokenizer's chat template)")
    instruction_column: str = _f("instruction", "instruction: the instruction column")
    input_column: str = _f("input", "instruction: the optional input column (\"\" = none)")
    output_column: str = _f("output", "instruction: the response column")
    messages_column: str = _f("", "instruction: a column of chat turns ({role, content} or "
                              "ShareGPT {from, value}); set it for chat records")
    prompt: str = _f("", "prompt-classification: the prompt, with {column} fields, e.g. "
                     "\"Sentence: {sentence}\\nSentiment:\"")
    label_prefix: str = _f(" ", "prompt-classification: text between prompt and label")
    text_columns: list = _f(["sentence"], "sequence-classification: one column, or two for "
                            "sentence pairs ([\"sentence1\", \"sentence2\"])")
    label_column: str = _f("label", "classification: label column (an index, or a label name)")
    label_names: list = _f([], "classification: label names in index order; in prompt "
                           "classification also the words the model must say")


@dataclass
class FederationConfig:
    num_clients: int = _f(3, "number of clients (SuperNodes); the data is split this many ways")
    rounds: int = _f(3, "federated rounds (0 = only evaluate the initial model)")
    fraction: float = _f(1.0, "fraction of clients sampled for training each round")
    client_cpus: float = _f(1.0, "CPUs reserved per simulated client (Ray resources)")
    client_threads: int = _f(1, "torch threads inside each client (0 = torch's default)")
    client_gpus: float = _f(0.0, "GPUs reserved per simulated client (0.5 = two per GPU)")
    min_clients: int = _f(1, "a round counts only if at least this many sampled clients "
                          "replied; otherwise it is retried, then the run stops (exit 1)")
    max_round_retries: int = _f(1, "how often a round with fewer than `min_clients` replies "
                                "is retried (with a fresh sample) before the run stops")


@dataclass
class TrainConfig:
    local_epochs: float = _f(1.0, "passes over the client's blocks per round (if local_steps=0)")
    local_steps: int = _f(0, "optimizer steps per round; > 0 overrides local_epochs")
    batch_size: int = _f(4, "blocks per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    optimizer: str = _f("adamw", "`adamw` or `sgd`; a fresh optimizer each round")
    lr: float = _f(2e-4, "learning rate (maximum of the cosine schedule)")
    lr_min: float = _f(0.0, "final learning rate of the cosine schedule")
    lr_schedule: str = _f("constant", "`constant`, or `cosine` / `linear` from lr to lr_min "
                          "across rounds")
    weight_decay: float = _f(0.0, "decoupled weight decay")
    max_grad_norm: float = _f(1.0, "clip the gradient norm (0 = no clipping)")
    precision: str = _f("fp32", "`fp32` or `bf16` (CPU/GPU autocast; weights stay in dtype)")
    seed: int = _f(0, "seed of data shuffling, partitions, LoRA init and local batches")
    early_stopping: dict = _f({}, "stop when the centralized metric stops improving: "
                              "{metric = \"eval_loss\", patience = 3, min_delta = 0.0}")


@dataclass
class StrategyConfig:
    name: str = _f("fedavg", "fedavg | fedavgm | fedprox | fedadam | fedyogi | fedadagrad")
    params: dict = _f({}, "constructor arguments of the Flower strategy, e.g. proximal_mu")


@dataclass
class EvalConfig:
    batch_size: int = _f(8, "examples per evaluation batch")
    max_blocks: int = _f(0, "evaluate at most N test blocks / examples (0 = all)")
    generate: bool = _f(True, "prompt-classification: also generate greedily and report "
                        "generation accuracy and ROUGE (slower than label scoring)")
    max_new_tokens: int = _f(0, "prompt-classification generation length (0 = longest "
                             "label + 2)")
    suites: list = _f([], "extra benchmarks for causal-LM runs: [\"mmlu\"]")
    suites_every: int = _f(0, "run the suites every N rounds (0 = before round 1 and at the end)")
    mmlu_source: str = _f("cais/mmlu", "MMLU-layout data: hub id, local file or offline:mmlu-cot")
    mmlu_subset: str = _f("all", "hub configuration of `mmlu_source`")
    mmlu_split: str = _f("test", "split of `mmlu_source`")
    mmlu_max_questions: int = _f(0, "use at most N questions (0 = all)")
    mmlu_mode: str = _f("letter", "`letter` (log-likelihood of A/B/C/D) or `choice` (of each "
                        "choice's text)")
    metric: str = _f("", "the run's headline metric: best round in summary.json, "
                     "checkpoints/best, early stopping, compare (\"\" = eval_accuracy for "
                     "classification tasks, else eval_loss)")


@dataclass
class OutputConfig:
    dir: str = _f("runs/latest", "run folder (metrics, logs, final model)")
    overwrite: bool = _f(True, "allow writing into a non-empty run folder")
    save_final: bool = _f(True, "save the final global model with save_pretrained")
    save_every: int = _f(0, "checkpoint the global model every N rounds (0 = never)")
    keep_last: int = _f(2, "how many periodic checkpoints to keep (the best is kept apart)")
    keep_best: bool = _f(False, "also keep checkpoints/best: the best round by `eval.metric`")
    plots: bool = _f(True, "write plots/*.png after every round and a report at the end")
    tensorboard: bool = _f(False, "write TensorBoard event files to tensorboard/")
    trackers: list = _f([], "optional experiment trackers: \"mlflow\", \"wandb\"")
    resume: bool = _f(False, "continue the run in `dir` from its latest checkpoint")


@dataclass
class KDConfig:
    enabled: bool = _f(False, "FedKD: clients distil a teacher into their (LoRA) student")
    teacher: str = _f("", "teacher model (hub id, folder, offline:NAME; \"\" = model.name); "
                      "full fine-tuned on the public slice, needs the student's tokenizer")
    teacher_data_pct: float = _f(0.0, "share of the client pool treated as public (the first "
                                 "part after the test split): teacher data, removed from "
                                 "every client partition")
    teacher_epochs: float = _f(1.0, "teacher fine-tuning epochs on the public slice")
    teacher_lr: float = _f(2e-5, "teacher learning rate")
    teacher_batch_size: int = _f(16, "teacher batch size")
    temperature: float = _f(2.0, "distillation temperature T")
    lambda_: float = _f(0.5, "weight of the KD term: (1-lambda)*CE + lambda*T^2*KL "
                        "(recipe key `lambda`)")


@dataclass
class CompareConfig:
    arms: list = _f([], "arms of `fedtune compare`: pretrained, centralized, local-only, "
                    "fedavg-full, fedlora, fedkd-lora, or a strategy name (fedprox, ...)")
    seeds: int = _f(1, "seeds per arm (train.seed, +1, ...); mean and std over them")
    metric: str = _f("", "the headline metric (\"\" = eval_accuracy for classification, "
                     "else eval_loss)")
    overrides: dict = _f({}, "per-arm recipe changes, e.g. { fedlora = [\"train.lr=5e-4\"] }")


SECTIONS = {
    "model": ModelConfig, "lora": LoraConfig, "data": DataConfig, "task": TaskConfig,
    "federation": FederationConfig, "train": TrainConfig, "strategy": StrategyConfig,
    "eval": EvalConfig, "output": OutputConfig, "kd": KDConfig, "compare": CompareConfig,
}
ALIASES = {("kd", "lambda"): "lambda_"}  # recipe keys that are Python keywords


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    def to_dict(self) -> dict:
        d = asdict(self)
        for (section, key), attr in ALIASES.items():
            d[section][key] = d[section].pop(attr)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def hash(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:12]


# ---------------------------------------------------------------- parsing and coercion

def _coerce(value, typ, key: str, problems: list[str]):
    """Return value as `typ`, or record a problem naming the key."""
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        list: lambda v: isinstance(v, list),
        dict: lambda v: isinstance(v, dict),
    }[typ]
    if not ok(value):
        problems.append(f"`{key}` must be {typ.__name__}, got {type(value).__name__} {value!r}")
        return None
    return float(value) if typ is float else value


def from_dict(raw: dict, problems: list[str] | None = None) -> Config:
    """Build a Config from nested dicts (a parsed recipe); unknown keys are problems."""
    own = problems is None
    problems = [] if own else problems
    cfg = Config()
    for section, sub in raw.items():
        if section not in SECTIONS:
            problems.append(f"unknown section `{section}`; known: {', '.join(SECTIONS)}")
            continue
        if not isinstance(sub, dict):
            problems.append(f"`{section}` must be a table")
            continue
        target = getattr(cfg, section)
        hints = typing.get_type_hints(type(target))
        for key, value in sub.items():
            key = ALIASES.get((section, key), key)
            if key not in hints:
                known = ", ".join(f.name for f in fields(target))
                problems.append(f"unknown key `{section}.{key}`; known: {known}")
                continue
            if (section, key) == ("output", "keep_best") and isinstance(value, str):
                problems.append("`output.keep_best` is true or false; the metric that picks "
                                f"the best round is `eval.metric` (e.g. eval.metric = "
                                f"\"{value or 'eval_loss'}\" and keep_best = true)")
                continue
            coerced = _coerce(value, hints[key], f"{section}.{key}", problems)
            if coerced is not None:
                setattr(target, key, coerced)
    if own and problems:
        raise ConfigError(problems)
    return cfg


def parse_override(item: str) -> tuple[list[str], object]:
    """`train.lr=1e-4` -> (["train", "lr"], 1e-4); values are TOML, bare words are strings."""
    if "=" not in item:
        raise ConfigError([f"override `{item}` is not KEY=VALUE (e.g. train.lr=1e-4)"])
    key, text = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word: model names, paths
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Merge `a.b=v` overrides into a nested dict; a string field keeps the literal text."""
    raw = json.loads(json.dumps(raw))  # deep copy
    for item in overrides:
        path, value = parse_override(item)
        if len(path) == 2 and path[0] in SECTIONS:
            attr = ALIASES.get((path[0], path[1]), path[1])
            hint = typing.get_type_hints(SECTIONS[path[0]]).get(attr)
            if hint is str and not isinstance(value, str):
                value = item.split("=", 1)[1].strip()  # output.dir=123 stays the string "123"
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([f"override `{item}`: `{part}` is not a table"])
        node[path[-1]] = value
    return raw


def load(recipe: str | Path | None = None, overrides: list[str] | None = None,
         check_paths: bool = True) -> Config:
    """Read a recipe TOML (or only defaults), apply overrides, validate everything."""
    raw: dict = {}
    problems: list[str] = []
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError([f"recipe file not found: {path}"])
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError([f"{path} is not valid TOML: {err}"]) from None
    raw = apply_overrides(raw, overrides or [])
    cfg = from_dict(raw, problems)
    problems += validate(cfg, check_paths=check_paths)
    if problems:
        raise ConfigError(problems)
    return cfg


def from_json(text: str) -> Config:
    return from_dict(json.loads(text))


# ---------------------------------------------------------------- semantic checks

STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad")
TASKS = ("causal-lm", "instruction", "prompt-classification", "sequence-classification")
PARTITIONERS = ("iid", "fixed-size", "dirichlet", "shards", "natural")
SUITES = ("mmlu",)
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


def looks_local(name: str, suffixes: tuple[str, ...] = ()) -> bool:
    """A name the user meant as a local path: it exists (relative to the working directory
    too), starts like a path, has more parts than a hub id (`org/name`) or ends in one of
    `suffixes` (a data file). Everything else is a hub id."""
    return (Path(name).expanduser().exists() or name.startswith(("/", "./", "../", "~"))
            or name.count("/") >= 2 or "\\" in name
            or (bool(suffixes) and name.lower().endswith(suffixes)))


def strategy_class(name: str):
    from flwr.serverapp import strategy as S

    return {"fedavg": S.FedAvg, "fedavgm": S.FedAvgM, "fedprox": S.FedProx,
            "fedadam": S.FedAdam, "fedyogi": S.FedYogi, "fedadagrad": S.FedAdagrad}[name]


# Set by fedtune from the federation section; a recipe must not set them in params.
MANAGED_STRATEGY_ARGS = ("fraction_train", "fraction_evaluate", "min_train_nodes",
                         "min_evaluate_nodes", "min_available_nodes", "weighted_by_key",
                         "arrayrecord_key", "configrecord_key", "train_metrics_aggr_fn",
                         "evaluate_metrics_aggr_fn")


# Ranges of the Flower strategies' own arguments: (low, high, low inclusive, high inclusive)
STRATEGY_RANGES = {
    "proximal_mu": (0.0, None, True, False),        # FedProx: 0 is FedAvg's client
    "server_momentum": (0.0, 1.0, True, False),     # FedAvgM
    "server_learning_rate": (0.0, None, False, False),
    "eta": (0.0, None, False, False),               # FedAdam / FedYogi / FedAdagrad
    "eta_l": (0.0, None, False, False),
    "beta_1": (0.0, 1.0, True, False),
    "beta_2": (0.0, 1.0, True, False),
    "tau": (0.0, None, False, False),
}


def _range_text(low, high, low_in, high_in) -> str:
    if high is None:
        return f"{'>=' if low_in else '>'} {low:g}"
    return f"in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def _in_range(value: float, low, high, low_in, high_in) -> bool:
    above = value >= low if low_in else value > low
    below = high is None or (value <= high if high_in else value < high)
    return above and below


def _check_strategy(cfg: StrategyConfig) -> list[str]:
    if cfg.name not in STRATEGIES:
        return [f"`strategy.name` = {cfg.name!r} is not one of {', '.join(STRATEGIES)}"]
    problems = []
    sig = inspect.signature(strategy_class(cfg.name).__init__).parameters
    for key, value in cfg.params.items():
        if key in MANAGED_STRATEGY_ARGS:
            problems.append(f"`strategy.params.{key}` is set by fedtune from [federation]")
        elif key not in sig:
            usable = [k for k in sig if k not in MANAGED_STRATEGY_ARGS + ("self",)]
            problems.append(f"unknown key `strategy.params.{key}` for {cfg.name}; "
                            + (f"known: {', '.join(usable)}" if usable else
                               f"{cfg.name} takes no parameters"))
        else:
            default = sig[key].default
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    problems.append(f"`strategy.params.{key}` must be a number, got {value!r}")
                elif key in STRATEGY_RANGES and not _in_range(value, *STRATEGY_RANGES[key]):
                    problems.append(f"`strategy.params.{key}` = {value!r} must be "
                                    f"{_range_text(*STRATEGY_RANGES[key])} for {cfg.name}")
    return problems


def config_warnings(cfg: Config) -> list[str]:
    """Valid but probably not what the user wants; printed, never fatal."""
    out = []
    s = cfg.strategy
    if s.name in ("fedadam", "fedyogi", "fedadagrad") and "eta" not in s.params:
        out.append(f"strategy {s.name} keeps Flower's default server step eta = 0.1, large "
                   f"for {'LoRA tensors' if cfg.model.finetune == 'lora' else 'model weights'}"
                   " (each entry may move by ~eta per round); set e.g. "
                   "`strategy.params.eta = 1e-3`")
    return out


TRACKERS = ("mlflow", "wandb")
LOWER_IS_BETTER = ("eval_loss", "eval_ppl")


def headline_metric(cfg: Config) -> str:
    """The metric that picks the best round everywhere (summary, checkpoints/best, early
    stopping, compare): `eval.metric`, else the task's own."""
    if cfg.eval.metric:
        return cfg.eval.metric
    return "eval_accuracy" if cfg.task.type in CLASSIFICATION_TASKS else "eval_loss"


def clients_per_round(cfg: Config) -> int:
    """How many clients Flower samples per round: int(n * fraction), at least 1."""
    return max(1, int(cfg.federation.num_clients * cfg.federation.fraction))


def metric_mode(metric: str) -> str:
    """`min` for losses and perplexity, `max` for accuracy-like metrics."""
    return "min" if metric in LOWER_IS_BETTER or metric.endswith("loss") else "max"


def _check_early_stopping(es: dict) -> list[str]:
    if not es:
        return []
    known = {"metric": str, "patience": int, "min_delta": (int, float)}
    p = [f"unknown key `train.early_stopping.{k}`; known: {', '.join(known)}"
         for k in es if k not in known]
    for key, typ in known.items():
        if key in es and (isinstance(es[key], bool) or not isinstance(es[key], typ)):
            p.append(f"`train.early_stopping.{key}` has the wrong type: {es[key]!r}")
    if "patience" not in es:
        p.append("`train.early_stopping` needs `patience` (rounds without improvement)")
    elif isinstance(es["patience"], int) and es["patience"] < 1:
        p.append("`train.early_stopping.patience` must be >= 1")
    metric = es.get("metric", "eval_loss")
    if isinstance(metric, str) and not metric.startswith("eval_"):
        p.append(f"`train.early_stopping.metric` = {metric!r}: early stopping watches the "
                 "centralized evaluation, so the metric must start with eval_")
    return p


CLASSIFICATION_TASKS = ("prompt-classification", "sequence-classification")


def _check_task(cfg: Config) -> list[str]:
    """Task keys that must agree with each other (columns are checked against the data)."""
    t, p = cfg.task, []
    if t.type not in TASKS:
        return p
    if t.type in CLASSIFICATION_TASKS:
        if len(t.label_names) < 2 or not all(isinstance(x, str) and x for x in t.label_names):
            p.append(f"`task.label_names` must list >= 2 label names for {t.type}, got "
                     f"{t.label_names!r}")
        elif len(set(t.label_names)) != len(t.label_names):
            p.append(f"`task.label_names` has duplicates: {t.label_names!r}")
    if t.type == "prompt-classification":
        if not t.prompt:
            p.append("`task.prompt` is empty: prompt-classification needs a prompt with "
                     "{column} fields, e.g. \"Sentence: {sentence}\\nSentiment:\"")
        else:
            import string
            try:
                list(string.Formatter().parse(t.prompt))
            except ValueError as err:
                p.append(f"`task.prompt` is not a valid format string: {err}")
    if t.type == "sequence-classification":
        if not 1 <= len(t.text_columns) <= 2 or not all(isinstance(c, str) and c
                                                        for c in t.text_columns):
            p.append(f"`task.text_columns` must name 1 or 2 columns, got {t.text_columns!r}")
    if t.type == "instruction":
        _choice(p, "task.template", t.template, ("alpaca", "chat"))
    if cfg.model.quantization and cfg.model.finetune != "lora":
        p.append(f"`model.quantization = \"{cfg.model.quantization}\"` needs `model.finetune = "
                 "\"lora\"` (quantized base weights cannot train)")
    if cfg.eval.suites and t.type == "sequence-classification":
        p.append("`eval.suites` (MMLU) needs a causal LM; this run is sequence-classification")
    return p


FIXED_ARMS = ("pretrained", "centralized", "local-only", "fedavg-full", "fedlora", "fedkd-lora")


def _check_kd_and_compare(cfg: Config) -> list[str]:
    k, c, d, p = cfg.kd, cfg.compare, cfg.data, []
    if not 0 <= k.teacher_data_pct < 1:
        p.append(f"`kd.teacher_data_pct` must be in [0, 1), got {k.teacher_data_pct}")
    if k.enabled and k.teacher_data_pct == 0:
        p.append("`kd.enabled` needs `kd.teacher_data_pct` > 0: the teacher trains on that "
                 "public slice")
    for key in ("temperature", "teacher_lr", "teacher_epochs", "teacher_batch_size"):
        _positive(p, f"kd.{key}", getattr(k, key))
    if not 0 <= k.lambda_ <= 1:
        p.append(f"`kd.lambda` must be in [0, 1], got {k.lambda_}")
    for arm in c.arms:
        if arm not in FIXED_ARMS and arm not in STRATEGIES:
            p.append(f"`compare.arms`: unknown arm {arm!r}; known: "
                     f"{', '.join(FIXED_ARMS + STRATEGIES)}")
    _positive(p, "compare.seeds", c.seeds)
    for arm, items in c.overrides.items():
        if arm not in FIXED_ARMS and arm not in STRATEGIES:
            p.append(f"`compare.overrides`: unknown arm {arm!r}")
        elif not isinstance(items, list) or not all(isinstance(x, str) and "=" in x
                                                    for x in items):
            p.append(f"`compare.overrides.{arm}` must be a list of \"section.key=value\"")
    if c.metric and not c.metric.startswith("eval_"):
        p.append(f"`compare.metric` = {c.metric!r} must be a centralized metric (eval_...)")
    if d.merge_partitions:
        n = d.split_clients
        if n < 1:
            p.append("`data.merge_partitions` needs `data.split_clients` (how many ways the "
                     "data is split)")
        elif not all(isinstance(i, int) and 0 <= i < n for i in d.merge_partitions):
            p.append(f"`data.merge_partitions` ids must be in 0..{n - 1}: {d.merge_partitions}")
        if cfg.federation.num_clients != 1:
            p.append("`data.merge_partitions` trains one client: set `federation.num_clients = 1`")
    return p


def _choice(problems, key, value, choices):
    if value not in choices:
        problems.append(f"`{key}` = {value!r} is not one of {', '.join(choices)}")


def _positive(problems, key, value, allow_zero=False):
    if value is None or value < 0 or (value == 0 and not allow_zero):
        problems.append(f"`{key}` must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: Config, check_paths: bool = True) -> list[str]:
    """Ranges, choices and (optionally) that local paths and offline assets exist."""
    p: list[str] = []
    m, d, fed, t = cfg.model, cfg.data, cfg.federation, cfg.train
    _choice(p, "model.finetune", m.finetune, ("lora", "full"))
    _choice(p, "model.dtype", m.dtype, ("float32", "bfloat16", "float16"))
    _choice(p, "task.type", cfg.task.type, TASKS)
    _choice(p, "data.partitioner", d.partitioner, PARTITIONERS)
    _choice(p, "model.quantization", m.quantization, ("", "4bit", "8bit"))
    _choice(p, "eval.mmlu_mode", cfg.eval.mmlu_mode, ("letter", "choice"))
    for name in cfg.eval.suites:
        if name not in SUITES:
            p.append(f"`eval.suites`: unknown suite {name!r}; known: {', '.join(SUITES)}")
    p += _check_task(cfg)
    _choice(p, "train.optimizer", t.optimizer, ("adamw", "sgd"))
    _choice(p, "train.lr_schedule", t.lr_schedule, ("constant", "cosine", "linear"))
    _choice(p, "train.precision", t.precision, ("fp32", "bf16"))
    _positive(p, "federation.rounds", fed.rounds, allow_zero=True)
    for key, value in [("lora.r", cfg.lora.r), ("lora.alpha", cfg.lora.alpha),
                       ("data.seq_len", d.seq_len), ("federation.num_clients", fed.num_clients),
                       ("federation.client_cpus",
                       fed.client_cpus), ("train.batch_size", t.batch_size),
                       ("train.grad_accum", t.grad_accum), ("train.lr", t.lr),
                       ("eval.batch_size", cfg.eval.batch_size)]:
        _positive(p, key, value)
    for key, value in [("data.max_samples", d.max_samples), ("data.test_samples",
                       d.test_samples), ("train.local_steps", t.local_steps),
                       ("train.local_epochs", t.local_epochs), ("train.lr_min", t.lr_min),
                       ("train.weight_decay", t.weight_decay), ("train.max_grad_norm",
                       t.max_grad_norm), ("eval.max_blocks", cfg.eval.max_blocks),
                       ("federation.client_threads", fed.client_threads),
                       ("federation.client_gpus", fed.client_gpus)]:
        _positive(p, key, value, allow_zero=True)
    if not 0 <= cfg.lora.dropout < 1:
        p.append(f"`lora.dropout` must be in [0, 1), got {cfg.lora.dropout}")
    if not 0 < fed.fraction <= 1:
        p.append(f"`federation.fraction` must be in (0, 1], got {fed.fraction}")
    if t.local_steps == 0 and t.local_epochs == 0:
        p.append("set `train.local_steps` or `train.local_epochs` above 0")
    if t.lr_min > t.lr:
        p.append(f"`train.lr_min` ({t.lr_min}) must not exceed `train.lr` ({t.lr})")
    if d.test_samples == 0:
        p.append("`data.test_samples` must be > 0: the server evaluates on a held-out split")
    if d.partitioner == "fixed-size" and d.samples_per_client <= 0:
        p.append("`data.partitioner = \"fixed-size\"` needs `data.samples_per_client` > 0")
    if d.partitioner in ("dirichlet", "shards", "natural") and not (
            d.partition_by or cfg.task.type in CLASSIFICATION_TASKS):
        p.append(f"`data.partitioner = \"{d.partitioner}\"` needs `data.partition_by` (a "
                 "label or grouping column)")
    if d.dirichlet_alpha <= 0:
        p.append(f"`data.dirichlet_alpha` must be > 0, got {d.dirichlet_alpha}")
    _positive(p, "data.shards_per_client", d.shards_per_client)
    _positive(p, "data.min_partition_size", d.min_partition_size, allow_zero=True)
    if d.partitioner == "iid" and d.samples_per_client:
        p.append("`data.samples_per_client` only applies to `data.partitioner = \"fixed-size\"`")
    if not all(isinstance(x, str) for x in cfg.lora.target_modules) or not cfg.lora.target_modules:
        p.append("`lora.target_modules` must be a non-empty list of module names")
    p += _check_strategy(cfg.strategy)
    p += _check_kd_and_compare(cfg)
    p += _check_early_stopping(t.early_stopping)
    o = cfg.output
    _positive(p, "output.save_every", o.save_every, allow_zero=True)
    for key in ("eval.max_new_tokens", "eval.suites_every", "eval.mmlu_max_questions"):
        _positive(p, key, getattr(cfg.eval, key.split(".")[1]), allow_zero=True)
    _positive(p, "output.keep_last", o.keep_last)
    for name in o.trackers:
        if name not in TRACKERS:
            p.append(f"`output.trackers`: unknown tracker {name!r}; known: {', '.join(TRACKERS)}")
    for key, wanted in [("output.tensorboard", ["tensorboard"] if o.tensorboard else []),
                        ("output.trackers", [n for n in o.trackers if n in TRACKERS])]:
        for pkg in wanted:
            if importlib.util.find_spec(pkg) is None:
                p.append(f"`{key}` needs the `{pkg}` package, which is not installed "
                         f"(pip install {pkg}); fedtune does not depend on it")
    metric = cfg.eval.metric
    if metric and not metric.startswith("eval_"):
        p.append(f"`eval.metric` = {metric!r} must name a centralized metric (eval_loss, "
                 "eval_accuracy, ...)")
    es_metric = t.early_stopping.get("metric")
    if isinstance(es_metric, str) and es_metric != headline_metric(cfg):
        p.append(f"`train.early_stopping.metric` = {es_metric!r} differs from the run's "
                 f"headline metric {headline_metric(cfg)!r}: the best round, checkpoints/best "
                 "and early stopping use one metric; set `eval.metric` instead")
    if m.dtype == "float16" and (m.finetune == "full" or cfg.task.type ==
                                 "sequence-classification"):
        what = ("full fine-tuning" if m.finetune == "full"
                else "the classifier head of sequence-classification")
        p.append(f"`model.dtype = \"float16\"` with {what} trains float16 weights, which "
                 "AdamW turns into NaN after one step (its eps 1e-8 is 0 in float16); use "
                 "`model.dtype = \"bfloat16\"`, or float32 weights with "
                 "`train.precision = \"bf16\"` (autocast)")
    if fed.min_clients < 1:
        p.append(f"`federation.min_clients` must be >= 1, got {fed.min_clients}")
    elif fed.min_clients > clients_per_round(cfg):
        p.append(f"`federation.min_clients` = {fed.min_clients} can never be met: only "
                 f"{clients_per_round(cfg)} clients are sampled per round (num_clients x "
                 "fraction); lower it or raise `federation.fraction`")
    _positive(p, "federation.max_round_retries", fed.max_round_retries, allow_zero=True)
    if check_paths:
        p += _check_sources(cfg)
    return p


EAGER_CHECK_BYTES = 64 * 2**20  # local data files up to this size are checked at load time


def check_data_file(path: Path, limit: int | None = EAGER_CHECK_BYTES) -> str | None:
    """Why a local data file cannot be read, in one sentence (None if nothing is found):
    empty, not UTF-8, the first malformed line of a .jsonl. Cheap enough to run while the
    recipe is validated for files up to `limit` bytes (larger ones are diagnosed only if
    `datasets` fails to read them)."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return f"data file {path} is empty: no rows to train on"
    if path.suffix == ".parquet" or (limit is not None and size > limit):
        return None
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        return (f"data file {path} is not UTF-8 text (line {line}, byte {err.start}); "
                "re-encode it as UTF-8, e.g. iconv -f latin1 -t utf-8")
    if not text.strip():
        return f"data file {path} holds only whitespace: no rows to train on"
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as err:
                return (f"data file {path} line {number} is not valid JSON ({err.msg}, "
                        f"column {err.colno}); fix or remove that line")
            if not isinstance(obj, dict):
                return (f"data file {path} line {number} is a JSON {type(obj).__name__}, "
                        "not an object with named columns")
    return None


def hub_unreachable(name: str, what: str = "model.name") -> str:
    """The one sentence for a hub id that cannot be fetched, with the fix."""
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    local_hint = f" (there is no local folder {name!r} either)" if "/" in name else ""
    return (f"cannot load `{what}` = {name!r}: the Hugging Face hub is "
            f"{'switched off (HF_HUB_OFFLINE=1)' if offline else 'unreachable or has no such model'}"
            f" and the model is not in the local cache{local_hint}; use a local folder "
            "(save_pretrained format, e.g. ./models/mine) or a packaged offline:NAME "
            f"({', '.join(assets.PREFIX + k for k in assets.OFFLINE_MODELS)})")


def offline_hub_problems(cfg: Config) -> list[str]:
    """With HF_HUB_OFFLINE=1, hub model ids that are not in the local cache: known in a
    fraction of a second, without importing transformers."""
    names = [("model.name", cfg.model.name)]
    if cfg.kd.enabled and cfg.kd.teacher:
        names.append(("kd.teacher", cfg.kd.teacher))
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        return []
    from huggingface_hub import try_to_load_from_cache

    return [hub_unreachable(name, key) for key, name in names
            if not assets.is_offline(name) and not looks_local(name)
            and not isinstance(try_to_load_from_cache(name, "config.json"), str)]


def _check_sources(cfg: Config) -> list[str]:
    p = []
    name = cfg.model.name
    if assets.is_offline(name):
        try:
            assets.check_offline_model(name)
        except FedtuneError as err:
            p.append(f"`model.name`: {err}")
    elif looks_local(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            p.append(f"`model.name`: {name!r} looks like a local folder but does not exist "
                     f"(relative to {Path.cwd()}); fix the path, or use a hub id (org/name) "
                     "or offline:NAME")
        elif not (path / "config.json").exists():
            p.append(f"`model.name`: {name!r} has no config.json (not a save_pretrained folder)")
    src = cfg.data.source
    if assets.is_offline(src):
        try:
            assets.check_offline_data(src)
        except FedtuneError as err:
            p.append(f"`data.source`: {err}")
    elif looks_local(src, DATA_SUFFIXES):
        path = Path(src).expanduser()
        if not path.exists():
            p.append(f"`data.source`: {src!r} looks like a local path but does not exist "
                     f"(relative to {Path.cwd()}); fix the path, or use a hub dataset id "
                     "(org/name) or offline:NAME")
        elif path.is_file() and path.suffix not in DATA_SUFFIXES:
            p.append(f"`data.source`: {src!r} has suffix {path.suffix!r}; "
                     f"supported: {', '.join(DATA_SUFFIXES)}")
        elif path.is_file() and (problem := check_data_file(path)):
            p.append(f"`data.source`: {problem}")
    return p


def describe() -> str:
    """Every key with its default and help line (for `fedtune keys` and the README)."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"[{section}]")
        names = {attr: key for (sec, key), attr in ALIASES.items() if sec == section}
        for f in fields(cls):
            default = f.default if f.default is not MISSING else f.default_factory()
            lines.append(f"  {names.get(f.name, f.name)} = {json.dumps(default)}  "
                         f"# {f.metadata['help']}")
    return "\n".join(lines)
