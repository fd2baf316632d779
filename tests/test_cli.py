"""The `m2r2-moe` command line as a user meets it: one-line errors naming the flag (exit 2), checks made
before any work, help with every default, the shared model loader, and no import circle."""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

import pytest

from m2r2_moe import cli
from m2r2_moe.cli_common import HelpFormatter, UsageError, existing_file, model_spec
from m2r2_moe.loading import ModelSpecError, load_model

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("demo", "train-adapters", "eval-predictor", "profile")
REQUIRED = {"train-adapters": ["--out", "unused.safetensors"]}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `m2r2-moe argv`, whether argparse exits or main returns."""
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, command: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"m2r2-moe {command}: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, err)


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: the command must refuse its input before any work."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    for module in ("m2r2_moe.cli", "m2r2_moe.predict.cli", "m2r2_moe.profile.cli"):
        monkeypatch.setattr(f"{module}.load_model", refuse)


@pytest.mark.parametrize("value", ["0", "-3"])
def test_cache_experts_zero_is_refused_as_negative_is(capsys, no_loading, value):
    code, _, err = run(capsys, "demo", "--model", "random", "--cache-experts", value)
    assert code == 2
    assert_one_line_error(err, "demo", "argument --cache-experts", "at least 1", f"got {value}")


def test_cache_experts_below_top_k_names_the_models_range(capsys):
    code, _, err = run(capsys, "demo", "--model", "random", "--cache-experts", "1")
    assert code == 2
    assert_one_line_error(err, "demo", "--cache-experts 1", "2..64")
    code, _, err = run(capsys, "profile", "--model", "random", "--cache-experts", "8,1", "--predictors", "none")
    assert code == 2
    assert_one_line_error(err, "profile", "--cache-experts 1", "2..64")


@pytest.mark.parametrize("command", COMMANDS)
def test_missing_model_folder_is_one_line_naming_what_model_accepts(capsys, no_loading, tmp_path, command):
    for bad in (str(tmp_path / "nowhere"), str(tmp_path), "builtin:no-such-model"):
        code, _, err = run(capsys, command, *REQUIRED.get(command, []), "--model", bad)
        assert code == 2
        assert_one_line_error(err, command, "argument --model", "'builtin'", "builtin:NAME", "'random'",
                              "checkpoint folder")


def test_bare_builtin_name_gets_a_hint(capsys, no_loading):
    code, _, err = run(capsys, "demo", "--model", "tiny-mixtral")
    assert code == 2 and "did you mean builtin:tiny-mixtral?" in err


def test_unloadable_checkpoint_is_one_line(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    code, _, err = run(capsys, "demo", "--model", str(tmp_path))
    assert code == 2
    assert_one_line_error(err, "demo", "cannot load the checkpoint", str(tmp_path))
    with pytest.raises(ModelSpecError, match="cannot load the checkpoint"):
        load_model(str(tmp_path))


def test_builtin_name_is_accepted_by_every_command():
    for name, parser in subparsers().items():
        args = parser.parse_args([*REQUIRED.get(name, []), "--model", "builtin:tiny-mixtral"])
        assert args.model == "builtin:tiny-mixtral"
    model, tokenizer = load_model("builtin:tiny-mixtral")
    assert tokenizer is not None and model.config.num_local_experts == 8


def test_demo_runs_a_named_builtin_model_with_its_shipped_adapters(capsys):
    code, out, err = run(capsys, "demo", "--model", "builtin:tiny-mixtral", "--max-new-tokens", "2",
                         "--device", "cpu")
    assert code == 0, err
    assert "predictor m2r2" in out and "offloaded tokens == original tokens" in out


@pytest.mark.parametrize("argv, flag", [(["eval-predictor", "--plot", "r.png"], "--plot"),
                                        (["profile", "--model", "random", "--plots", "out"], "--plots")])
def test_plots_without_matplotlib_are_refused_before_any_work(capsys, monkeypatch, no_loading, argv, flag):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # `import matplotlib` fails
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert_one_line_error(err, argv[0], flag, 'pip install "m2r2_moe[plot]"')


def test_bad_link_ratios_name_the_flag_typed(capsys, no_loading):
    for value in ("0,x", "x", "-1", "2,0", ""):
        code, _, err = run(capsys, "profile", "--link-ratios", value)
        assert code == 2
        assert_one_line_error(err, "profile", "argument --link-ratios")
        assert "link_gbps" not in err


def test_link_ratio_too_slow_to_emulate_names_the_flag(capsys):
    code, _, err = run(capsys, "profile", "--model", "random", "--predictors", "none", "--link-ratios", "2,1e9",
                       "--new-tokens", "2", "--prompt-tokens", "4")
    assert code == 2
    assert_one_line_error(err, "profile", "--link-ratios 1e+09", "use ratios up to")
    assert "link_gbps" not in err


def numeric_options():
    """(command, flag) of every option that parses a value, but the free-form ones."""
    free = {model_spec, existing_file}
    for name, parser in subparsers().items():
        for action in parser._actions:
            if action.type is not None and action.type not in free and action.dest != "seed":
                yield name, next(o for o in action.option_strings if o.startswith("--"))


@pytest.mark.parametrize("command, flag", list(numeric_options()))
def test_every_bad_numeric_flag_is_refused_by_argparse_naming_it(capsys, no_loading, command, flag):
    for value in ("-5", "x", "nan"):
        code, _, err = run(capsys, command, *REQUIRED.get(command, []), flag, value)
        assert code == 2, (flag, value)
        assert_one_line_error(err, command, f"argument {flag}")


@pytest.mark.parametrize("argv, words", [
    (["profile", "--new-tokens", "1"], ["--new-tokens", "at least 2"]),
    (["profile", "--policies", "fifo"], ["--policies", "lru, predictive"]),
    (["eval-predictor", "--predictors", "history,psychic"], ["--predictors", "'psychic'"]),
    (["eval-predictor", "--mass", "1.5"], ["--mass", "(0, 1]"]),
    (["demo", "--link-gbps", "0.0001"], ["--link-gbps", "0.001"]),
])
def test_values_out_of_range_name_the_flag_and_the_range(capsys, no_loading, argv, words):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert_one_line_error(err, argv[0], *words)


@pytest.mark.parametrize("argv, words", [
    (["eval-predictor", "--max-tokens", "10"], ["--max-tokens 10", "--seq-len 256"]),
    (["eval-predictor", "--predictors", "none"], ["--predictors", "history"]),
    (["train-adapters", "--out", "a.safetensors", "--text", "/no/such/file"], ["--text", "/no/such/file"]),
    (["demo", "--device", "tpu"], ["--device", "tpu"]),
    (["train-adapters", "--out", "."], ["--out .", "is a folder"]),
])
def test_inconsistent_input_is_refused_right_after_parsing(capsys, no_loading, argv, words):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert_one_line_error(err, argv[0], *words)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_a_line_and_the_default_of_every_option(capsys, command):
    parser = subparsers()[command]
    formatter = HelpFormatter(parser.prog)
    for action in parser._actions:
        assert action.help, action.option_strings
        if action.nargs != 0 and not action.required:  # flags are off unless given; --out has no default
            assert "default" in formatter._get_help_string(action), action.option_strings
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and out.count("default") >= sum(a.nargs != 0 and not a.required for a in parser._actions)


def test_demo_help_shows_defaults():
    text = subparsers()["demo"].format_help()
    assert "(default: 48)" in text and "(default: builtin)" in text and "(default: 2.0)" in text


def test_cost_table_is_labelled():
    cost = {"model_active_params": 2_500_000, "model_flops_per_token": 5_000_000,
            "history": {"seconds_per_token": 4e-5},
            "m2r2": {"seconds_per_token": 2e-3, "adapter_params": 135_168, "adapter_flops_per_token": 180_224,
                     "adapter_flops_share": 0.036, "adapter_params_share": 0.054}}
    from m2r2_moe.predict.cli import cost_table

    lines = cost_table(cost).splitlines()
    assert "cost per token" in lines[0] and "time" in lines[0] and "params" in lines[0] and "FLOPs" in lines[0]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert set(rows) == {"model", "history", "m2r2"}
    assert "0.040 ms" in rows["history"] and "2.000 ms" in rows["m2r2"]
    assert "135.17 k (5.4%)" in rows["m2r2"] and "180.22 k (3.6%)" in rows["m2r2"]
    assert "2.50 M" in rows["model"] and "5.00 M" in rows["model"]


def test_eval_predictor_prints_the_cost_as_a_table_and_keeps_it_in_the_json(capsys, tmp_path):
    out_file = tmp_path / "sub" / "eval.json"
    code, out, err = run(capsys, "eval-predictor", "--predictors", "history,gate", "--lookahead", "1",
                         "--max-tokens", "64", "--seq-len", "32", "--json", str(out_file))
    assert code == 0, err
    assert not any(line.lstrip().startswith("{") for line in out.splitlines())  # no bare JSON line
    assert "cost per token" in out
    cost = json.loads(out_file.read_text())["cost"]
    assert set(cost) >= {"model_active_params", "history", "gate"}
    assert cost["history"]["seconds_per_token"] > 0


@pytest.mark.parametrize("argv, flag", [(["demo", "--model", "random", "--predictor", "m2r2"], "--predictor"),
                                        (["profile", "--model", "random", "--predictors", "none,m2r2"],
                                         "--predictors")])
def test_missing_adapters_name_the_command_line_flag(capsys, argv, flag):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert_one_line_error(err, argv[0], f"{flag} m2r2", "--adapters PATH", "m2r2-moe train-adapters")
    assert "adapters=PATH" not in err


def test_model_without_tokenizer_is_refused_where_text_is_read(capsys):
    code, _, err = run(capsys, "eval-predictor", "--model", "random")
    assert code == 2
    assert_one_line_error(err, "eval-predictor", "--model random", "tokenizer")


def test_train_adapters_help_points_to_docs_design():
    text = subparsers()["train-adapters"].format_help()
    assert "docs/design.md" in text and "DESIGN.md" not in text


def imported_modules(path: Path) -> set[str]:
    """Modules `path` imports, relative imports resolved against the package of `path`."""
    package = list(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return names


def test_no_module_imports_the_cli_module():
    users = [ROOT / "m2r2_moe" / "predict" / "cli.py", ROOT / "m2r2_moe" / "profile" / "cli.py",
             ROOT / "m2r2_moe" / "loading.py", ROOT / "m2r2_moe" / "cli_common.py",
             *sorted((ROOT / "benchmarks").glob("*.py"))]
    for path in users:
        assert "m2r2_moe.cli" not in imported_modules(path), path
    assert "m2r2_moe.loading.load_model" in imported_modules(ROOT / "benchmarks" / "overhead.py")
    assert "m2r2_moe.cli" in imported_modules(ROOT / "tools" / "profile_prefetch.py")  # the resolver works


def test_random_model_loads_without_tokenizer():
    model, tokenizer = load_model("random")
    assert tokenizer is None and model.config.vocab_size == 512 and not model.training


@pytest.mark.parametrize("verbose_first", [True, False])
def test_verbose_shows_the_traceback(capsys, verbose_first):
    argv = ["demo", "--model", "random", "--predictor", "m2r2"]
    with pytest.raises(UsageError, match="--adapters PATH"):
        cli.main(["-v", *argv] if verbose_first else [*argv, "--verbose"])


def test_trained_adapters_drive_the_demo(capsys, tmp_path):
    text = tmp_path / "calibration.py"
    text.write_text("def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n" * 4)
    out = tmp_path / "adapters.safetensors"
    code, stdout, err = run(capsys, "train-adapters", "--text", str(text), "--out", str(out), "--lookahead", "1",
                            "--rank", "2", "--seq-len", "8", "--max-tokens", "32")
    assert code == 0 and out.is_file(), err
    assert "trained 7 adapters (depth 1, rank 2)" in stdout
    code, stdout, err = run(capsys, "demo", "--adapters", str(out), "--max-new-tokens", "2", "--device", "cpu")
    assert code == 0, err
    assert "predictor m2r2" in stdout and "offloaded tokens == original tokens" in stdout


def test_lookahead_auto_trains_every_distance_the_model_has(capsys, tmp_path):
    from m2r2_moe.predict import AcceleratorAdapters
    from m2r2_moe.predict.cli import AUTO_TRAIN_LOOKAHEAD

    text = tmp_path / "calibration.py"
    text.write_text("def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n" * 4)
    out = tmp_path / "adapters.safetensors"
    code, stdout, err = run(capsys, "train-adapters", "--text", str(text), "--out", str(out), "--rank", "2",
                            "--lookahead", "auto", "--width", "4", "--epochs", "1", "--seq-len", "8",
                            "--max-tokens", "32")
    depth = min(AUTO_TRAIN_LOOKAHEAD, 8 - 1)  # the built-in model has 8 MoE layers
    assert code == 0 and f"(depth {depth}, rank 2)" in stdout, err
    assert AcceleratorAdapters.load(out).depth == depth
    code, stdout, err = run(capsys, "eval-predictor", "--predictors", "m2r2", "--adapters", str(out),
                            "--max-tokens", "64", "--seq-len", "32")
    assert code == 0, err
    header = stdout.splitlines()[0]  # eval --lookahead auto: the adapters' depth
    assert f"d={depth}:" in header and f"d={depth + 1}:" not in header, stdout
