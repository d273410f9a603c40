"""Bad input: one clear line, exit code 2, before anything heavy, no run folder left."""

import shutil
import subprocess
import sys

import pytest

import bad_inputs
from fedtune import config as C, data
from fedtune.cli import main


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir, tiny_gpt2_dir):
    tmp = tmp_path_factory.mktemp("bad")
    return tmp, bad_inputs.write_inputs(tmp, tiny_model_dir, tiny_gpt2_dir)


@pytest.mark.parametrize("case", list(bad_inputs.TABLE))
def test_bad_input_is_one_line_and_exit_2(case, inputs, tiny_gpt2_dir, monkeypatch, capsys):
    tmp, recipe = inputs
    monkeypatch.chdir(tmp)  # relative paths in the table are relative to here
    before = sorted(p.name for p in tmp.rglob("*"))
    code = main(bad_inputs.argv(case, tmp, tiny_gpt2_dir, recipe))
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith("fedtune: warning:")]
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("fedtune: "), err
    assert bad_inputs.TABLE[case][1] in err[0], err[0]
    assert "Traceback" not in err[0]
    assert not (tmp / "out").exists()  # no run folder at all
    assert sorted(p.name for p in tmp.rglob("*")) == before  # nothing written anywhere


def test_the_real_entry_point_prints_no_traceback(inputs, tiny_gpt2_dir):
    tmp, recipe = inputs
    args = bad_inputs.argv("hub model while offline", tmp, tiny_gpt2_dir, recipe)
    proc = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    debug = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "--debug", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp,
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr  # --debug shows it


def test_existing_relative_paths_without_dot_slash_are_local(
    tmp_path, monkeypatch, tiny_model_dir, code_jsonl
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mydata").mkdir()
    shutil.copy(code_jsonl, tmp_path / "mydata" / "x.jsonl")
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "mine")
    cfg = C.load(None, ["model.name=models/mine", "data.source=mydata/x.jsonl"])
    assert C.looks_local(cfg.model.name) and C.looks_local(cfg.data.source)
    assert len(data.load_source(cfg.data)) == 24
    (tmp_path / "r.toml").write_text(
        '[model]\nname = "models/mine"\n[data]\nsource = "mydata/x.jsonl"\nseq_len = 32\n'
        'test_samples = 4\n[lora]\ntarget_modules = ["q_proj"]\n'
    )
    assert main(["validate", "r.toml"]) == 0


def test_rope_model_past_its_positions_is_a_warning(tiny_model_dir, code_jsonl, capsys):
    """RoPE extrapolates instead of failing: run it, but say so."""
    from fedtune.preflight import preflight

    cfg = C.load(
        None,
        [
            f"model.name={tiny_model_dir}",
            f"data.source={code_jsonl}",
            "data.seq_len=300",
            "lora.target_modules=['q_proj']",
            "federation.num_clients=2",
            "data.test_samples=2",
        ],
    )
    warnings = preflight(cfg)
    assert any("exceeds" in w and "256 trained positions" in w for w in warnings)


def test_fedadam_default_eta_is_a_warning():
    cfg = C.load(None, ["strategy.name=fedadam"], check_paths=False)
    assert any("eta = 0.1" in w for w in C.config_warnings(cfg))
    tuned = C.load(None, ["strategy.name=fedadam", "strategy.params.eta=0.001"], check_paths=False)
    assert C.config_warnings(tuned) == []
