"""Model: load a base model once, wrap it for full or LoRA fine-tuning, move trainable state.

Why one notion of "trainable state": whatever has `requires_grad` is what trains, what the
server aggregates and what travels; for LoRA that is the adapter tensors, for full
fine-tuning every parameter (tied weights once, since `named_parameters` de-duplicates).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import RemoteEntryNotFoundError

from fedtune import assets
from fedtune.config import Config, hub_unreachable, looks_local
from fedtune.errors import HubModelError, ModelError
from fedtune.files import atomic_write_json

LINEAR_HINTS = ("proj", "attn", "query", "key", "value", "dense", "fc")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# config attributes that bound the sequence length of learned position embeddings
POSITION_LIMITS = ("max_position_embeddings", "n_positions", "max_sequence_length")


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether `device` runs bf16 matmuls natively: CUDA with bf16, or a CPU with AVX512-BF16
    or AMX. Elsewhere bf16 is emulated: on an AVX2-only AMD EPYC a 1024 x 1024 bf16 matmul
    ran at 0.94 GFLOP/s against 178 in fp32, and the demo's local step went from ~2 s to
    ~100 s."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def resolved_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """`train.precision` as it runs on `device`: "auto" is bf16 where that is native."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(precision: str, device: torch.device | str = "cpu"):
    """bf16 autocast (weights keep their dtype) or nothing; used by training and evaluation."""
    if resolved_precision(precision, device) == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()


def _load_error(name: str, err: Exception) -> ModelError:
    """One sentence for a model that cannot be loaded, with the fix."""
    if looks_local(name):
        return ModelError(
            f"cannot load `model.name` = {name!r} from its local folder: "
            f"{str(err).strip().splitlines()[0]}"
        )
    return HubModelError(hub_unreachable(name))


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(assets.resolve_model(name))
    except OSError as err:
        raise _load_error(name, err) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_config(name: str):
    """The model's config.json (a few KB): what preflight checks read before any weights."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(assets.resolve_model(name))
    except (OSError, ValueError) as err:
        raise _load_error(name, err) from None


def config_json(name: str) -> dict:
    """config.json as a plain dict: a local folder's file, or the hub's (through the
    huggingface_hub cache, so HF_HUB_OFFLINE is honoured). Preflight reads it instead of
    `AutoConfig`, whose import chain alone (transformers' config classes import torch and
    its integrations) costs ~2 s before the first bad-input message."""
    path = Path(assets.resolve_model(name)).expanduser()
    try:
        if path.is_dir():
            return json.loads((path / "config.json").read_text())
        if looks_local(name):
            raise OSError(f"there is no folder {name!r}")
        return json.loads(Path(hf_hub_download(name, "config.json")).read_text())
    except RemoteEntryNotFoundError:  # the hub answered: no such file (not: no cache)
        raise ModelError(
            f"`model.name` = {name!r} has no config.json on the hub: is it a transformers model?"
        ) from None
    except (OSError, ValueError) as err:  # missing file, hub errors (OSError), bad JSON
        raise _load_error(name, err) from None


def position_limit(config: dict) -> tuple[int | None, bool]:
    """(the longest sequence the model's position embeddings cover, whether it uses RoPE,
    which extrapolates past that silently instead of failing), from config.json."""
    config = {**config.get("text_config", {}), **config}
    limit = next((config[k] for k in POSITION_LIMITS if isinstance(config.get(k), int)), None)
    rope = any(config.get(k) for k in ("rope_theta", "rope_parameters", "rope_scaling"))
    return limit, rope


def module_names(cfg: Config, config: dict) -> list[str]:
    """Every module name of the model without loading weights: what LoRA's
    `target_modules` are matched against. A local folder's safetensors headers list its
    parameters (milliseconds), plus `lm_head` when `config` (config.json) ties it to the input
    embeddings (tied weights are saved once, under the embedding's name). Without
    safetensors files, or for a classifier (its head is new), a weightless (meta-device)
    copy is built: ~3 s of transformers imports."""
    folder = Path(assets.resolve_model(cfg.model.name)).expanduser()
    found = _names_in_safetensors(folder)
    if found and cfg.task.type != "sequence-classification":
        tied = config.get("tie_word_embeddings", True)
        return sorted(set(found) | ({"lm_head"} if tied else set()))
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = load_config(cfg.model.name)
    cls = (
        AutoModelForSequenceClassification
        if cfg.task.type == "sequence-classification"
        else AutoModelForCausalLM
    )
    with torch.device("meta"):
        model = cls.from_config(config)
    return [n for n, _ in model.named_modules() if n]


def _names_in_safetensors(folder: Path) -> list[str]:
    """Module names (every prefix of every parameter name) from *.safetensors headers."""
    from safetensors import safe_open

    names = set()
    for f in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                parts = key.split(".")[:-1]
                names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return sorted(names)


def check_lora_targets(names: list[str], targets: list[str], model_name: str) -> None:
    """Every listed target must adapt at least one module (PEFT matches a module whose
    name equals the target or ends with `.target`); a typo must not pass silently."""
    if targets == ["all-linear"]:
        return
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        leaves = {n.split(".")[-1] for n in names}
        linear = sorted(n for n in leaves if any(k in n for k in LINEAR_HINTS))[:10]
        raise ModelError(
            f"`lora.target_modules` {unmatched} match no module of {model_name} "
            f"(listed: {targets}); its layers include {linear}"
        )


def check_runtime(cfg: Config) -> None:
    """Fail before any process starts when the machine cannot do what the recipe asks."""
    if cfg.model.quantization:
        if not torch.cuda.is_available():
            raise ModelError(
                f'`model.quantization = "{cfg.model.quantization}"` (QLoRA) '
                "needs a CUDA GPU (bitsandbytes quantizes on the GPU) and this "
                "machine has none; remove the key to train the unquantized model"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ModelError(
                f'`model.quantization = "{cfg.model.quantization}"` needs the '
                "`bitsandbytes` package: pip install bitsandbytes"
            )


def _quantization_config(cfg: Config):
    from transformers import BitsAndBytesConfig

    if cfg.model.quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_model(cfg: Config, seed: int | None = None):
    """Base model (+ LoRA adapter initialised from `seed`), ready to train on CPU/GPU.

    A causal LM, or for `sequence-classification` an encoder with a fresh classifier head
    (its initialisation is seeded, so the server and every client build the same one)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    check_runtime(cfg)
    seed = cfg.train.seed if seed is None else seed
    path = assets.resolve_model(cfg.model.name)
    kwargs = {"dtype": DTYPES[cfg.model.dtype]}
    if cfg.model.quantization:
        kwargs.update(quantization_config=_quantization_config(cfg), device_map={"": 0})
    torch.manual_seed(seed)
    try:
        if cfg.task.type == "sequence-classification":
            names = cfg.task.label_names
            model = AutoModelForSequenceClassification.from_pretrained(
                path,
                num_labels=len(names),
                id2label=dict(enumerate(names)),
                label2id={n: i for i, n in enumerate(names)},
                **kwargs,
            )
            if model.config.pad_token_id is None:  # GPT-style backbones: find the last token
                model.config.pad_token_id = load_tokenizer(cfg.model.name).pad_token_id
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise _load_error(cfg.model.name, err) from None
    model.config.use_cache = False
    if cfg.model.quantization:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.model.gradient_checkpointing
        )
    elif torch.cuda.is_available():
        model.to("cuda")
    if cfg.model.gradient_checkpointing and not cfg.model.quantization:
        model.gradient_checkpointing_enable()
    if cfg.model.finetune == "lora":
        model = add_lora(model, cfg, seed=seed)
    return model


def add_lora(model, cfg: Config, seed: int):
    from peft import LoraConfig, get_peft_model

    # peft 0.21 calls a transformers method that transformers 5.23 marks deprecated
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")

    names = cfg.lora.target_modules
    target = "all-linear" if names == ["all-linear"] else names
    check_lora_targets([n for n, _ in model.named_modules()], names, cfg.model.name)
    torch.manual_seed(seed)  # identical adapter init on server and every client
    # SEQ_CLS makes PEFT train (and us send) the new classifier head along with the adapter
    task_type = "SEQ_CLS" if cfg.task.type == "sequence-classification" else "CAUSAL_LM"
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=target,
        task_type=task_type,
    )
    model = get_peft_model(model, lora)
    if cfg.lora.aggregation == "ffa":  # A stays its seeded init, the same on every side
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p.requires_grad_(False)
    return model


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The tensors that train and travel, keyed by parameter name."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


@contextmanager
def frozen(model, keys: set[str]):
    """Parameters named in `keys` do not train (nor count as trainable) inside the block."""
    params = [p for n, p in model.named_parameters() if n in keys and p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in params:
            p.requires_grad_(True)


def lora_factors(model) -> dict[str, torch.Tensor]:
    """Every LoRA factor, trainable or not (FFA-LoRA's frozen A), keyed by parameter name."""
    return {n: p.detach() for n, p in model.named_parameters() if ".lora_" in n}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    """Copy received tensors into the trainable parameters, checking names and shapes."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, extra = params.keys() - state.keys(), state.keys() - params.keys()
    if missing or extra:
        raise ModelError(
            f"received arrays do not match the model: {len(missing)} missing "
            f"(e.g. {sorted(missing)[:2]}), {len(extra)} unexpected "
            f"(e.g. {sorted(extra)[:2]}); do server and clients use one recipe?"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.as_tensor(state[name]).to(p.dtype))


def to_arrays(model):
    """Trainable state as a Flower ArrayRecord (bf16 goes as fp32: the wire has no bf16)."""
    from flwr.app import ArrayRecord

    state = {
        n: (t.float() if t.dtype == torch.bfloat16 else t).cpu()
        for n, t in trainable_state(model).items()
    }
    return ArrayRecord(state)


def from_arrays(record) -> dict[str, torch.Tensor]:
    return record.to_torch_state_dict()


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def save_base(model, tokenizer, folder: Path) -> None:
    """The frozen weights as they are now, without the adapter (FedEx-LoRA corrects them):
    `AutoModel*.from_pretrained(folder)`, then `PeftModel.from_pretrained(base, final)`."""
    base = copy.deepcopy(model).unload()
    base.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def save_final(model, tokenizer, folder: Path, base_name: str) -> None:
    """save_pretrained format: a PEFT adapter for LoRA, a full model otherwise. An adapter
    names its base by `assets.hub_id` (the hub repository of an offline model, not the
    converted copy's path on this machine), so `AutoPeftModel*.from_pretrained` works
    elsewhere; the local path stays in the model card."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    adapter = Path(folder) / "adapter_config.json"
    if adapter.is_file():
        config = json.loads(adapter.read_text())
        config["base_model_name_or_path"] = assets.hub_id(base_name)
        atomic_write_json(adapter, config)
