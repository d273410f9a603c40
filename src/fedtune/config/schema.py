"""The recipe schema: one frozen dataclass per section, every field with its default and help.

Why here and nowhere else: the defaults, the allowed choices (`Literal` types) and the help
lines live in exactly one place; parsing, `fedtune keys` and validation all read them from
these classes. A Config is frozen once decoded: change it with `updated(...)`, which
builds a new one, so no code path can alter a config another part of the run already read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Literal, get_args


def _f(default, help: str, range: str = ""):  # noqa: A002 - the names read best below
    """A field with its help line and, for numbers, its allowed range: "> 0", ">= 0" or an
    interval such as "[0, 1)" (checked by `parse.py`, shown by `fedtune keys`)."""
    meta = {"help": help, "range": range}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    if dataclasses.is_dataclass(default):
        return field(default_factory=type(default), metadata=meta)
    return field(default=default, metadata=meta)


Finetune = Literal["lora", "full"]
Dtype = Literal["float32", "bfloat16", "float16"]
Quantization = Literal["", "4bit", "8bit"]
Task = Literal["causal-lm", "instruction", "prompt-classification", "sequence-classification"]
Template = Literal["alpaca", "chat"]
Partitioner = Literal["iid", "fixed-size", "dirichlet", "shards", "natural"]
LoraAggregation = Literal["naive", "ffa", "rolora", "fedex", "svd"]
FedexDtype = Literal["fp32", "fp16", "bf16"]
Optimizer = Literal["adamw", "sgd"]
Schedule = Literal["constant", "cosine", "linear"]
Precision = Literal["fp32", "bf16", "auto"]
Strategy = Literal[
    "fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad",
    "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan",
]  # fmt: skip
MmluMode = Literal["letter", "choice"]
Suite = Literal["mmlu"]
Tracker = Literal["mlflow", "wandb"]
Compression = Literal["fp32", "fp16", "bf16", "int8", "topk", "topk-int8"]
DpMode = Literal["", "central-fixed", "central-adaptive", "client-fixed", "local"]
Accounting = Literal["without-replacement", "poisson"]
Arm = Literal[
    "pretrained", "centralized", "local-only", "fedavg-full", "fedlora", "fedkd-lora", Strategy
]

STRATEGIES: tuple[str, ...] = get_args(Strategy)
TASKS: tuple[str, ...] = get_args(Task)
PARTITIONERS: tuple[str, ...] = get_args(Partitioner)
SUITES: tuple[str, ...] = get_args(Suite)
TRACKERS: tuple[str, ...] = get_args(Tracker)
FIXED_ARMS = ("pretrained", "centralized", "local-only", "fedavg-full", "fedlora", "fedkd-lora")
CLASSIFICATION_TASKS = ("prompt-classification", "sequence-classification")


@dataclass(frozen=True)
class ModelConfig:
    name: str = _f(
        "offline:smollm2-135m-instruct",
        "hub id (facebook/opt-350m), local folder, or offline:NAME (packaged asset)",
    )
    finetune: Finetune = _f("lora", "`lora` (only adapter tensors train and travel) or `full`")
    dtype: Dtype = _f("float32", "weight dtype")
    gradient_checkpointing: bool = _f(False, "trade compute for activation memory")
    quantization: Quantization = _f(
        "",
        '"" (none), "4bit" (QLoRA, NF4) or "8bit" base weights; needs bitsandbytes and a CUDA GPU',
    )


@dataclass(frozen=True)
class LoraConfig:
    r: int = _f(8, "LoRA rank", "> 0")
    alpha: int = _f(16, "LoRA scaling numerator (scale = alpha / r)", "> 0")
    dropout: float = _f(0.05, "dropout on the LoRA input", "[0, 1)")
    target_modules: list[str] = _f(["q_proj", "v_proj"], 'module names to adapt, or ["all-linear"]')
    aggregation: LoraAggregation = _f(
        "naive",
        "naive: FedAvg of A and B (gives mean(B) mean(A), not the mean update mean(B_i A_i)); "
        "ffa: FFA-LoRA, A frozen at its seeded init on every side, only B trains and travels "
        "(the mean is exact, half the bytes); rolora: RoLoRA, B trains in odd rounds and A in "
        "even ones, the other frozen and identical everywhere (exact, half the uplink); fedex: "
        "FedEx-LoRA, mean A and B plus the residual mean(s B_i A_i) - s mean(B) mean(A) folded "
        "into the frozen weights on every side (exact; the correction travels dense); svd: "
        "FlexLoRA, the exact mean update re-factorised by truncated SVD to rank r on the server "
        "and to each client's rank (`client_ranks`) on the way down",
    )
    client_ranks: list[int] = _f(
        [],
        "svd: LoRA rank of each client, in turn by partition id (e.g. [4, 8, 16]); empty = r "
        "for all. The server's adapter (evaluated, saved) has rank r",
    )
    fedex_dtype: FedexDtype = _f(
        "fp32", "fedex: how the dense correction travels (fp16/bf16 halve its bytes)"
    )


@dataclass(frozen=True)
class DataConfig:
    source: str = _f(
        "offline:python-stdlib",
        "hub dataset id, local .jsonl/.json/.csv/.parquet/.txt file, a folder "
        "of source files, or offline:NAME",
    )
    subset: str = _f("", "hub dataset configuration name (load_dataset's second argument)")
    split: str = _f("train", "split to read from a hub dataset")
    text_column: str = _f("text", "column holding the text")
    file_glob: str = _f("**/*.py", "which files to read when `source` is a folder")
    max_samples: int = _f(0, "use only the first N samples after shuffling (0 = all)", ">= 0")
    test_samples: int = _f(
        64, "samples held out for the server's test split (never on clients)", "> 0"
    )
    partitioner: Partitioner = _f(
        "iid",
        "fixed-size: `samples_per_client` each; dirichlet: "
        "over `partition_by`; shards: k label shards per client; "
        "natural: one group per client",
    )
    samples_per_client: int = _f(0, "samples per client for `fixed-size` (seed runs: 1000)", ">= 0")
    partition_by: str = _f(
        "",
        "column the non-IID partitioners and the partition histogram "
        'use ("" = the task\'s label column, if any)',
    )
    dirichlet_alpha: float = _f(0.5, "Dirichlet concentration: small = skewed clients", "> 0")
    shards_per_client: int = _f(2, "`shards`: label-sorted shards per client (k labels)", "> 0")
    min_partition_size: int = _f(
        1, "`dirichlet`: resample until every client has this many", ">= 0"
    )
    merge_partitions: list[int] = _f(
        [],
        "baselines: train ONE client on these partitions (ids "
        "of the `split_clients`-way split) merged: all ids = "
        "centralized, [i] = client i alone (local-only)",
    )
    split_clients: int = _f(0, "with merge_partitions: how many ways the data is split", ">= 0")
    seq_len: int = _f(128, "tokens per packed training block", "> 0")


@dataclass(frozen=True)
class TaskConfig:
    type: Task = _f(
        "causal-lm",
        "causal-lm (packed text, loss on every token) | instruction "
        "(prompt + response, loss on the response) | prompt-classification "
        "(prompt + verbal label, loss on the label) | sequence-classification "
        "(encoder + classifier head)",
    )
    template: Template = _f(
        "alpaca",
        "instruction: `alpaca` (the Alpaca prompt) or `chat` (the tokenizer's chat template)",
    )
    instruction_column: str = _f("instruction", "instruction: the instruction column")
    input_column: str = _f("input", 'instruction: the optional input column ("" = none)')
    output_column: str = _f("output", "instruction: the response column")
    messages_column: str = _f(
        "",
        "instruction: a column of chat turns ({role, content} or "
        "ShareGPT {from, value}); set it for chat records",
    )
    prompt: str = _f(
        "",
        "prompt-classification: the prompt, with {column} fields, e.g. "
        '"Sentence: {sentence}\\nSentiment:"',
    )
    label_prefix: str = _f(" ", "prompt-classification: text between prompt and label")
    text_columns: list[str] = _f(
        ["sentence"],
        "sequence-classification: one column, or two "
        'for sentence pairs (["sentence1", "sentence2"])',
    )
    label_column: str = _f("label", "classification: label column (an index, or a label name)")
    label_names: list[str] = _f(
        [],
        "classification: label names in index order; in prompt "
        "classification also the words the model must say",
    )


@dataclass(frozen=True)
class FederationConfig:
    num_clients: int = _f(
        3, "number of clients (SuperNodes); the data is split this many ways", "> 0"
    )
    rounds: int = _f(3, "federated rounds (0 = only evaluate the initial model)", ">= 0")
    fraction: float = _f(1.0, "fraction of clients sampled for training each round", "(0, 1]")
    client_cpus: float = _f(
        1.0, "CPUs reserved per simulated client (Ray resources): cores / client_cpus actors "
        "train at once; = cores with client_threads = cores trains clients in turn on every "
        "core (the demos: within 4% of 1-thread actors, bench/actors_threads.py, one model "
        "copy in RAM instead of one per actor)", "> 0",
    )  # fmt: skip
    client_threads: int = _f(1, "torch threads inside each client (0 = torch's default)", ">= 0")
    client_gpus: float = _f(0.0, "GPUs reserved per simulated client (0.5 = two per GPU)", ">= 0")
    min_clients: int = _f(
        1,
        "a round counts only if at least this many sampled clients "
        "replied; otherwise it is retried, then the run stops (exit 1)",
        ">= 1",
    )
    max_round_retries: int = _f(
        1,
        "how often a round with fewer than `min_clients` replies "
        "is retried (with a fresh sample) before the run stops",
        ">= 0",
    )
    round_timeout_s: float = _f(
        0.0, "replies not in this many seconds after a round starts are dropped as late "
        "(0 = wait for every sampled client)", ">= 0",
    )  # fmt: skip


@dataclass(frozen=True)
class EarlyStoppingConfig:
    patience: int = _f(
        0, "stop after this many rounds without improvement (0 = never stop)", ">= 0"
    )
    metric: str = _f("", 'the metric watched ("" = the run\'s headline metric, `eval.metric`)')
    min_delta: float = _f(0.0, "an improvement smaller than this does not count", ">= 0")


@dataclass(frozen=True)
class TrainConfig:
    local_epochs: float = _f(
        1.0, "passes over the client's blocks per round (if local_steps=0)", ">= 0"
    )
    local_steps: int = _f(0, "optimizer steps per round; > 0 overrides local_epochs", ">= 0")
    batch_size: int = _f(4, "blocks per micro-batch", "> 0")
    grad_accum: int = _f(1, "micro-batches per optimizer step", "> 0")
    optimizer: Optimizer = _f("adamw", "a fresh optimizer each round")
    lr: float = _f(2e-4, "learning rate (maximum of the cosine schedule)", "> 0")
    lr_min: float = _f(0.0, "final learning rate of the cosine schedule", ">= 0")
    lr_schedule: Schedule = _f(
        "constant", "`constant`, or `cosine` / `linear` from lr to lr_min across rounds"
    )
    weight_decay: float = _f(0.0, "decoupled weight decay", ">= 0")
    max_grad_norm: float = _f(1.0, "clip the gradient norm (0 = no clipping)", ">= 0")
    precision: Precision = _f(
        "fp32", "bf16: CPU/GPU autocast, weights stay in model.dtype; auto: bf16 where the "
        "device has it natively (CUDA, AVX512-BF16/AMX CPUs; emulated it is ~50x slower)",
    )  # fmt: skip
    group_by_length: bool = _f(
        True, "batch examples of similar length, batches in a seeded random order (less "
        "padding: instruct demo 31% -> 3.5%, bench/step.py); packed blocks are unchanged by it",
    )  # fmt: skip
    compile: bool = _f(
        False, "torch.compile the loss step: demo step 1.14x faster on a 2-core CPU after "
        "a 270 s compile (bench/compile_step.py), paid again by every new process; "
        "dropout masks come from another random stream",
    )  # fmt: skip
    fused_loss: bool = _f(
        True, "causal LMs: apply the head and the loss only at labelled positions, in "
        "chunks (same loss; false = the model's own full-logits loss)",
    )  # fmt: skip
    seed: int = _f(0, "seed of data shuffling, partitions, LoRA init and local batches")
    early_stopping: EarlyStoppingConfig = _f(
        EarlyStoppingConfig(), "stop when the centralized metric stops improving"
    )


@dataclass(frozen=True)
class StrategyConfig:
    name: Strategy = _f("fedavg", "the Flower strategy (flwr.serverapp.strategy)")
    params: dict = _f({}, "constructor arguments of the Flower strategy, e.g. proximal_mu")
    accumulate: Literal["float32", "float64"] = _f(
        "float32", "dtype of the server's running sum of the clients' tensors (any wire dtype)"
    )


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = _f(8, "examples per evaluation batch", "> 0")
    every: int = _f(
        1, "evaluate on the server's test split at round 0, every N rounds and the last "
        "(0 = only the last round); early stopping counts evaluations", ">= 0",
    )  # fmt: skip
    max_blocks: int = _f(0, "evaluate at most N test blocks / examples (0 = all)", ">= 0")
    generate: bool = _f(
        True,
        "prompt-classification: also generate greedily and report "
        "generation accuracy and ROUGE (slower than label scoring)",
    )
    max_new_tokens: int = _f(
        0, "prompt-classification generation length (0 = longest label + 2)", ">= 0"
    )
    suites: list[Suite] = _f([], "extra benchmarks for causal-LM runs")
    suites_every: int = _f(
        0, "run the suites every N rounds (0 = before round 1 and at the end)", ">= 0"
    )
    mmlu_source: str = _f("cais/mmlu", "MMLU-layout data: hub id, local file or offline:mmlu-cot")
    mmlu_subset: str = _f("all", "hub configuration of `mmlu_source`")
    mmlu_split: str = _f("test", "split of `mmlu_source`")
    mmlu_max_questions: int = _f(0, "use at most N questions (0 = all)", ">= 0")
    mmlu_mode: MmluMode = _f(
        "letter", "`letter` (log-likelihood of A/B/C/D) or `choice` (of each choice's text)"
    )
    metric: str = _f(
        "",
        "the run's headline metric: best round in summary.json, "
        'checkpoints/best, early stopping, compare ("" = eval_accuracy for '
        "classification tasks, else eval_loss)",
    )


@dataclass(frozen=True)
class OutputConfig:
    dir: str = _f("runs/latest", "run folder (metrics, logs, final model)")
    overwrite: bool = _f(True, "allow writing into a non-empty run folder")
    save_final: bool = _f(True, "save the final global model with save_pretrained")
    save_every: int = _f(0, "checkpoint the global model every N rounds (0 = never)", ">= 0")
    keep_last: int = _f(2, "how many periodic checkpoints to keep (the best is kept apart)", "> 0")
    keep_best: bool = _f(False, "also keep checkpoints/best: the best round by `eval.metric`")
    plots: bool = _f(True, "write plots/*.png after every round and a report at the end")
    tensorboard: bool = _f(False, "write TensorBoard event files to tensorboard/")
    trackers: list[Tracker] = _f([], "optional experiment trackers")
    resume: bool = _f(False, "continue the run in `dir` from its latest checkpoint")


@dataclass(frozen=True)
class KDConfig:
    enabled: bool = _f(False, "FedKD: clients distil a teacher into their (LoRA) student")
    teacher: str = _f(
        "",
        'teacher model (hub id, folder, offline:NAME; "" = model.name); '
        "full fine-tuned on the public slice, needs the student's tokenizer",
    )
    teacher_data_pct: float = _f(
        0.0,
        "share of the client pool treated as public (the first "
        "part after the test split): teacher data, removed from "
        "every client partition",
        "[0, 1)",
    )
    teacher_epochs: float = _f(1.0, "teacher fine-tuning epochs on the public slice", "> 0")
    teacher_lr: float = _f(2e-5, "teacher learning rate", "> 0")
    teacher_batch_size: int = _f(16, "teacher batch size", "> 0")
    temperature: float = _f(2.0, "distillation temperature T", "> 0")
    lambda_: float = _f(
        0.5, "weight of the KD term: (1-lambda)*CE + lambda*T^2*KL (recipe key `lambda`)", "[0, 1]"
    )


@dataclass(frozen=True)
class CommConfig:
    uplink: Compression = _f(
        "fp32",
        "how client replies travel: fp32 (exact), fp16/bf16 "
        "(the weights), int8 / topk / topk-int8 (the update, with "
        "error feedback kept in the client's context.state)",
    )
    downlink: Compression = _f(
        "fp32",
        "how the global model travels; int8/topk send its "
        "difference from the shared initial weights",
    )
    topk_fraction: float = _f(0.1, "share of each tensor's entries the topk modes send", "(0, 1]")
    block: int = _f(128, "values per scale in the int8 modes", "[64, 256]")
    budget_mb: float = _f(
        0.0, "warn when the run's total MB (up + down) cross this (0 = no budget)", ">= 0"
    )
    budget_stop: bool = _f(
        False, "stop the run (after the round that crossed it) instead of only warning"
    )


@dataclass(frozen=True)
class RobustConfig:
    max_update_norm: float = _f(
        0.0, "reject a reply whose update (its weights - the global weights it received) "
        "has a larger L2 norm (0 = no limit); NaN/Inf, missing or extra keys, wrong shapes "
        "or dtypes are always rejected", ">= 0",
    )  # fmt: skip
    clip_update_norm: float = _f(
        0.0, "scale every accepted update down to at most this L2 norm before aggregating "
        "(0 = no clipping)", ">= 0",
    )  # fmt: skip


@dataclass(frozen=True)
class DpConfig:
    mode: DpMode = _f(
        "", '"" (off); central-fixed / central-adaptive: the server clips each update and '
        "adds Gaussian noise to the mean; client-fixed: clients clip, the server adds the "
        "noise; local: each client clips and noises its own update (Flower's DP wrappers "
        "and mods)",
    )  # fmt: skip
    clipping_norm: float = _f(
        1.0, "L2 bound of each client's update (central-adaptive: its first value)", "> 0"
    )
    noise_multiplier: float = _f(
        1.0, "central modes: noise stddev on the mean = noise_multiplier * clipping_norm / "
        "clients per round", "> 0",
    )  # fmt: skip
    delta: float = _f(1e-5, "the delta at which the privacy spent (epsilon) is reported", "(0, 1)")
    accounting: Accounting = _f(
        "without-replacement", "central modes: how the RDP accountant models client "
        "sampling: without-replacement (what Flower does: a fixed number, replace-one "
        "neighbours) or poisson (McMahan et al. 2018, add/remove-one, rate k/N)",
    )  # fmt: skip
    target_clipped_quantile: float = _f(
        0.5, "central-adaptive: share of updates the clipping norm should leave unclipped",
        "[0, 1]",
    )  # fmt: skip
    clip_norm_lr: float = _f(0.2, "central-adaptive: step size of the clipping norm", "> 0")
    clipped_count_stddev: float = _f(
        0.0, "central-adaptive: noise on the count of clipped updates (0 = Flower's "
        "default, clients per round / 20)", ">= 0",
    )  # fmt: skip
    local_epsilon: float = _f(
        0.5, "local: epsilon of each client's noised update per round (Gaussian mechanism, "
        "valid below 1)", "(0, 1)",
    )  # fmt: skip
    local_delta: float = _f(1e-5, "local: delta of each client's update per round", "(0, 1)")


@dataclass(frozen=True)
class PrivacyConfig:
    dp: DpConfig = _f(DpConfig(), "differential privacy of what travels, and its accounting")


@dataclass(frozen=True)
class CompareConfig:
    arms: list[Arm] = _f([], "arms of `fedtune compare` (a strategy name runs that strategy)")
    seeds: int = _f(1, "seeds per arm (train.seed, +1, ...); mean and std over them", "> 0")
    metric: str = _f(
        "", 'the headline metric ("" = eval_accuracy for classification, else eval_loss)'
    )
    overrides: dict = _f({}, 'per-arm recipe changes, e.g. { fedlora = ["train.lr=5e-4"] }')


SECTIONS = {
    "model": ModelConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "task": TaskConfig,
    "federation": FederationConfig,
    "train": TrainConfig,
    "strategy": StrategyConfig,
    "eval": EvalConfig,
    "output": OutputConfig,
    "kd": KDConfig,
    "comm": CommConfig,
    "robust": RobustConfig,
    "privacy": PrivacyConfig,
    "compare": CompareConfig,
}
ALIASES = {("kd", "lambda"): "lambda_"}  # recipe keys that are Python keywords

# Keys that never change what a run computes: where it writes, how it is hosted, what it
# logs to. `Config.hash()` leaves them out, so one experiment has one hash wherever it runs.
NOT_HASHED = {"output": None, "federation": ("client_cpus", "client_threads", "client_gpus")}


@dataclass(frozen=True)
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
    comm: CommConfig = field(default_factory=CommConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    def to_dict(self) -> dict:
        d = asdict(self)
        for (section, key), attr in ALIASES.items():
            d[section][key] = d[section].pop(attr)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def hash(self) -> str:
        """12 hex digits of everything that changes results (not `NOT_HASHED`)."""
        d = self.to_dict()
        for section, keys in NOT_HASHED.items():
            for key in keys or list(d[section]):
                d[section].pop(key)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def updated(cfg, section: str, **changes):
    """A copy of `cfg` with some keys of one section changed (configs are frozen)."""
    return dataclasses.replace(
        cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)}
    )
