import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedtune import config as C

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.toml"))


def write(tmp_path, text):
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


def test_defaults_are_valid_without_checking_paths():
    cfg = C.load(None, [], check_paths=False)
    assert cfg.federation.num_clients == 3 and cfg.model.finetune == "lora"


def test_unknown_key_and_section_are_named(tmp_path):
    p = write(tmp_path, "[train]\nlrr = 1.0\n[trian]\nlr = 1.0\n")
    with pytest.raises(C.ConfigError) as err:
        C.load(p, check_paths=False)
    msg = str(err.value)
    assert "`train.lrr`" in msg and "unknown section `trian`" in msg


def test_wrong_types_are_rejected_all_at_once(tmp_path):
    p = write(tmp_path, '[federation]\nrounds = "3"\n[model]\ngradient_checkpointing = 1\n')
    with pytest.raises(C.ConfigError) as err:
        C.load(p, check_paths=False)
    assert len(err.value.problems) == 2
    assert "`federation.rounds` must be int" in str(err.value)
    assert "`model.gradient_checkpointing` must be bool" in str(err.value)


def test_int_is_accepted_for_float_but_not_bool_for_int(tmp_path):
    cfg = C.load(write(tmp_path, "[train]\nlr = 1\n"), check_paths=False)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    with pytest.raises(C.ConfigError):
        C.load(write(tmp_path, "[federation]\nrounds = true\n"), check_paths=False)


def test_overrides_are_typed_and_strings_stay_literal():
    cfg = C.load(
        None,
        [
            "train.lr=1e-5",
            "federation.rounds=7",
            "output.dir=123",
            "model.name=facebook/opt-350m",
            "lora.target_modules=['c_attn']",
            "strategy.name=fedprox",
            "strategy.params.proximal_mu=0.1",
        ],
        check_paths=False,
    )
    assert cfg.train.lr == 1e-5 and cfg.federation.rounds == 7
    assert cfg.output.dir == "123" and cfg.model.name == "facebook/opt-350m"
    assert cfg.lora.target_modules == ["c_attn"]
    assert cfg.strategy.params == {"proximal_mu": 0.1}


def test_override_without_equals_is_an_error():
    with pytest.raises(C.ConfigError, match="KEY=VALUE"):
        C.load(None, ["train.lr"], check_paths=False)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("federation.fraction=0", "federation.fraction"),
        ("federation.rounds=-1", "federation.rounds"),
        ("train.lr=-1", "train.lr"),
        ("lora.dropout=1.5", "lora.dropout"),
        ("model.finetune=half", "model.finetune"),
        ("task.type=summarize", "task.type"),
        ("data.partitioner=fixed-size", "samples_per_client"),
        ("train.lr_min=1.0", "lr_min"),
        ("strategy.name=fedfoo", "strategy.name"),
        ("strategy.params.mu=0.1", "strategy.params.mu"),
        ("strategy.params.fraction_train=0.5", "set by fedtune"),
    ],
)
def test_ranges_and_choices(override, needle):
    with pytest.raises(C.ConfigError) as err:
        C.load(None, [override], check_paths=False)
    assert needle in str(err.value)


def test_strategy_params_are_checked_against_flower_signatures():
    cfg = C.load(
        None, ["strategy.name=fedavgm", "strategy.params.server_momentum=0.9"], check_paths=False
    )
    assert cfg.strategy.params["server_momentum"] == 0.9
    with pytest.raises(C.ConfigError, match="must be a number"):
        C.load(
            None, ["strategy.name=fedprox", "strategy.params.proximal_mu='x'"], check_paths=False
        )


def test_missing_local_paths_are_reported():
    with pytest.raises(C.ConfigError) as err:
        C.load(None, ["model.name=./no/such/model", "data.source=/no/such/file.jsonl"])
    msg = str(err.value)
    assert "'./no/such/model' looks like a local folder but does not exist" in msg
    assert "'/no/such/file.jsonl' looks like a local path but does not exist" in msg


def test_local_file_suffix_is_checked(tmp_path):
    bad = tmp_path / "data.xlsx"
    bad.write_text("x")
    with pytest.raises(C.ConfigError, match="suffix '.xlsx'"):
        C.load(None, [f"data.source={bad}"])


def test_hub_ids_pass_validation_offline():
    cfg = C.load(
        None, ["model.name=facebook/opt-350m", "data.source=codeparrot/codeparrot-clean-valid"]
    )
    assert cfg.data.source == "codeparrot/codeparrot-clean-valid"


def test_json_round_trip():
    cfg = C.load(
        None,
        ["train.lr=3e-4", "strategy.name=fedprox", "strategy.params.proximal_mu=0.0"],
        check_paths=False,
    )
    again = C.from_json(cfg.to_json())
    assert again == cfg and again.hash() == cfg.hash()


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_recipe_validates(recipe):
    C.load(recipe)


def test_seed_recipes_mirror_the_seed_experiments():
    avgm = C.load(ROOT / "recipes/opt350m-codeparrot-fedavgm.toml")
    prox = C.load(ROOT / "recipes/opt350m-codeparrot-fedprox.toml")
    for cfg in (avgm, prox):
        assert cfg.model.name == "facebook/opt-350m" and cfg.model.finetune == "full"
        assert cfg.data.source == "codeparrot/codeparrot-clean-valid"
        assert (cfg.federation.num_clients, cfg.data.samples_per_client) == (3, 1000)
        assert (cfg.train.local_epochs, cfg.train.lr) == (3, 1e-5)
        assert (cfg.train.batch_size, cfg.eval.batch_size) == (2, 4)
    assert avgm.strategy.name == "fedavgm" and avgm.federation.rounds == 20
    assert prox.strategy.name == "fedprox" and prox.federation.rounds == 10
    assert prox.strategy.params["proximal_mu"] == 0.1


def test_cli_rejects_a_bad_key_fast_and_clearly():
    t0 = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedtune.cli",
            "run",
            str(ROOT / "recipes/demo.toml"),
            "--set",
            "train.lrr=1",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "unknown key `train.lrr`" in proc.stderr
    assert time.time() - t0 < 5


@pytest.mark.parametrize(
    "override,needle",
    [
        ("strategy.params.proximal_mu=-0.1", "`strategy.params.proximal_mu` = -0.1 must be >= 0"),
        ("strategy.params.server_momentum=1.0", "must be in [0, 1)"),
        ("strategy.params.server_learning_rate=0", "must be > 0"),
        ("strategy.params.eta=-1", "`strategy.params.eta` = -1 must be > 0"),
        ("strategy.params.beta_1=1.5", "must be in [0, 1)"),
    ],
)
def test_strategy_parameter_ranges(override, needle):
    name = {
        "proximal_mu": "fedprox",
        "server_momentum": "fedavgm",
        "server_learning_rate": "fedavgm",
    }.get(override.split(".")[2].split("=")[0], "fedadam")
    with pytest.raises(C.ConfigError) as err:
        C.load(None, [f"strategy.name={name}", override], check_paths=False)
    assert needle in str(err.value)


def test_keep_best_is_a_switch_and_the_metric_is_eval_metric():
    with pytest.raises(C.ConfigError, match="`output.keep_best` is true or false.*eval.metric"):
        C.load(None, ["output.keep_best='eval_accuracy'"], check_paths=False)
    cls = C.load(
        None, ["task.type=sequence-classification", "task.label_names=['a','b']"], check_paths=False
    )
    assert C.headline_metric(cls) == "eval_accuracy"
    assert C.headline_metric(C.load(None, [], check_paths=False)) == "eval_loss"
    assert (
        C.headline_metric(C.load(None, ["eval.metric=eval_ppl"], check_paths=False)) == "eval_ppl"
    )
    with pytest.raises(C.ConfigError, match="early_stopping.metric.*differs"):
        C.load(None, ["train.early_stopping={metric='eval_ppl', patience=2}"], check_paths=False)


def test_min_clients_and_retries_are_checked():
    with pytest.raises(C.ConfigError, match="can never be met: only 1 clients"):
        C.load(
            None,
            ["federation.num_clients=4", "federation.fraction=0.25", "federation.min_clients=2"],
            check_paths=False,
        )
    with pytest.raises(C.ConfigError, match="max_round_retries"):
        C.load(None, ["federation.max_round_retries=-1"], check_paths=False)


def _long_hub_runs():
    """Hub recipes of `fedtune run` with 3+ rounds (comparisons rerun their arms instead)."""
    out = []
    for r in RECIPES:
        cfg = C.load(r, check_paths=False)
        if "offline:" not in cfg.model.name and not cfg.compare.arms and cfg.federation.rounds >= 3:
            out.append(r)
    return out


LONG_HUB = _long_hub_runs()


def test_the_seed_hub_runs_are_among_the_long_ones():
    assert {
        "opt350m-codeparrot-fedavgm.toml",
        "alpaca-lora-fedavg.toml",
        "bert-cola-fedavg.toml",
    } <= {r.name for r in LONG_HUB}


@pytest.mark.parametrize("recipe", LONG_HUB, ids=[r.name for r in LONG_HUB])
def test_long_hub_recipes_checkpoint_and_say_so(recipe):
    """A multi-hour run must be resumable: checkpoints at least every few rounds."""
    cfg = C.load(recipe)
    assert 1 <= cfg.output.save_every <= 5, cfg.output.save_every
    header = "".join(line for line in recipe.read_text().splitlines(True) if line.startswith("#"))
    assert "--resume" in header and "heckpoint" in header


def test_hash_covers_what_changes_results_only():
    base = C.load(None, [], check_paths=False)
    hosted = C.load(
        None,
        [
            "output.dir=/elsewhere/run",
            "federation.client_threads=4",
            "federation.client_cpus=2",
            "output.trackers=[]",
            "output.plots=false",
            "output.save_every=3",
        ],
        check_paths=False,
    )
    assert hosted.hash() == base.hash()
    for changed in (
        "train.lr=1e-3",
        "federation.rounds=4",
        "data.seq_len=64",
        "train.early_stopping.patience=2",
    ):
        assert C.load(None, [changed], check_paths=False).hash() != base.hash(), changed


def test_choices_come_from_literal_types_and_keys_lists_them():
    import typing

    hints = typing.get_type_hints(C.ModelConfig)
    assert C.choices(hints["finetune"]) == ("lora", "full")
    assert C.choices(typing.get_type_hints(C.StrategyConfig)["name"]) == C.STRATEGIES
    keys = C.describe()
    assert 'finetune = "lora"' in keys and "[lora, full]" in keys
    assert "early_stopping.patience = 0" in keys and "[in [0, 1)]" in keys
    with pytest.raises(
        C.ConfigError,
        match=r"`model.dtype` = 'fp16' is not one of float32, "
        r"bfloat16, float16",
    ):
        C.load(None, ["model.dtype=fp16"], check_paths=False)
    with pytest.raises(C.ConfigError, match=r"`lora.dropout` must be in \[0, 1\), got 1.5"):
        C.load(None, ["lora.dropout=1.5"], check_paths=False)


def test_a_bad_strategy_name_is_one_problem_not_a_cascade():
    with pytest.raises(C.ConfigError) as err:
        C.load(None, ["strategy.name=fedfoo", "strategy.params.proximal_mu=0.1"], check_paths=False)
    assert err.value.problems == [
        "`strategy.name` = 'fedfoo' is not one of " + ", ".join(C.STRATEGIES)
    ]


def test_config_is_frozen_and_updated_makes_a_new_one(tmp_path):
    import dataclasses

    cfg = C.load(write(tmp_path, "[train.early_stopping]\npatience = 2\n"), check_paths=False)
    assert cfg.train.early_stopping == C.EarlyStoppingConfig(patience=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.output.dir = "x"
    moved = C.updated(cfg, "output", dir="/tmp/x")
    assert moved.output.dir == "/tmp/x" and cfg.output.dir == "runs/latest"
    assert moved.train is cfg.train


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_opens_with_its_own_command_and_what_to_expect(recipe):
    head = recipe.read_text().split("\n[", 1)[0]
    verb = "compare" if C.load(recipe, check_paths=False).compare.arms else "run"
    assert f"#   fedtune {verb} recipes/{recipe.name}\n" in head
    assert "\n# Expected " in head
