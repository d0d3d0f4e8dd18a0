"""The command line: flags generated from the config dataclasses, documented command lines parse to the
config they mean, and every user error exits through one base class with its message and no traceback."""

from __future__ import annotations

import argparse
import json
import typing
from dataclasses import dataclass, fields, replace
from typing import Literal

import pytest

import train
from meta.config import SECTIONS, EvalConfig, GenConfig, MetaConfig, RunConfig, Split
from meta.config_cli import add_dataclass_flags, check_supported, field_comments, parse_value
from optimizers.errors import UserError
from optimizers.learned import ConfigError

PRESETS = train.presets()
DEFAULT, SMOKE = PRESETS["default"], PRESETS["smoke"]


def _parse(argv: list[str]) -> RunConfig:
    return train.resolve_config(train.build_parser().parse_args(argv))


def _with(cfg: RunConfig, **sections) -> RunConfig:
    """``cfg`` with ``meta={...}``-style section changes and run-level ones."""
    top = {k: v for k, v in sections.items() if k not in SECTIONS}
    nested = {k: replace(getattr(cfg, k), **v) for k, v in sections.items() if k in SECTIONS}
    return replace(cfg, **top, **nested)


# ---- command lines of the README, docs and tests parse to the config they mean ---------------------
COMMAND_LINES = [
    (["run"], DEFAULT),
    (["meta-train", "--preset", "smoke", "--out-dir", "runs/smoke"], _with(SMOKE, out_dir="runs/smoke")),
    (["meta-train", "--preset", "default", "--meta.estimator", "pes", "--meta.pairs", "4", "--out-dir", "runs/pes"],
     _with(DEFAULT, meta={"estimator": "pes", "pairs": 4}, out_dir="runs/pes")),
    (["run", "--meta.distribution", "broad", "--meta.meta_loss", "log_train", "--meta.outer_steps", "500",
      "--out-dir", "runs/broad"],
     _with(DEFAULT, meta={"distribution": "broad", "meta_loss": "log_train", "outer_steps": 500}, out_dir="runs/broad")),
    (["evaluate", "--checkpoint", "runs/pes/checkpoint", "--eval.num_tasks", "40"], _with(DEFAULT, eval={"num_tasks": 40})),
    (["meta-train", "--meta.population", "32", "--out-dir", "runs/big", "--resume", "auto"],
     _with(DEFAULT, meta={"population": 32}, out_dir="runs/big")),
    (["meta-train", "--eval.adam_lrs", "1e-3,1e-2", "--lo.time_taus", "1,10", "--lo.features", "grad,momentum"],
     _with(DEFAULT, eval={"adam_lrs": (1e-3, 1e-2)}, lo={"time_taus": (1.0, 10.0), "features": ("grad", "momentum")})),
    (["generations", "--gen.control", "false", "--gov.sustain_rollback", "off", "--lo.nominal_schedule", "0",
      "--gen.successor_lo", '{"hidden_width": 16}', "--gov.rate_limit", "100", "--checkpoint-every", "3"],
     _with(DEFAULT, gen={"control": False, "successor_lo": '{"hidden_width": 16}'},
           gov={"sustain_rollback": False, "rate_limit": 100.0}, lo={"nominal_schedule": False}, checkpoint_every=3)),
    (["meta-train", "--preset", "smoke", "--meta.outer_lr", "1", "--meta.schedule", "log_uniform", "--eval.split",
      "test", "--gen.approval", "file", "--gen.start", "fresh", "--wandb", "online", "--threads", "2"],
     _with(SMOKE, meta={"outer_lr": 1.0, "schedule": "log_uniform"}, eval={"split": "test"},
           gen={"approval": "file", "start": "fresh"}, wandb="online", threads=2)),
]


@pytest.mark.parametrize("argv,expected", COMMAND_LINES, ids=[" ".join(a) for a, _ in COMMAND_LINES])
def test_documented_command_lines_parse_to_the_config_built_directly(argv, expected):
    cfg = _parse(argv)
    assert cfg == expected
    assert cfg.to_dict() == expected.to_dict()  # and the same JSON (types included: 1.0, not 1)
    assert type(cfg.meta.outer_lr) is float and type(cfg.meta.population) is int


def test_a_config_file_and_flags_compose(tmp_path):
    path = tmp_path / "my_run.json"
    path.write_text(json.dumps({"meta": {"population": 4}, "eval": {"adam_lrs": [0.001]}}))
    cfg = _parse(["meta-train", "--config", str(path), "--wandb", "online", "--meta.population", "6"])
    assert cfg == _with(DEFAULT, meta={"population": 6}, eval={"adam_lrs": (0.001,)}, wandb="online")


# ---- the flags are generated from the annotations ---------------------------------------------------
def _options(command: str) -> dict[str, argparse.Action]:
    parser = train.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {s: a for a in sub._actions for s in a.option_strings}


@pytest.mark.parametrize("command", ["run", "meta-train", "evaluate", "generations"])
def test_every_config_field_has_a_flag(command):
    options = _options(command)
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            assert f"--{section}.{f.name}" in options, f"{section}.{f.name}"
    for f in fields(RunConfig):
        if f.name not in SECTIONS:
            assert f"--{f.name.replace('_', '-')}" in options, f.name


def test_literal_fields_offer_their_choices():
    options = _options("meta-train")
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if typing.get_origin(hints[f.name]) is Literal:
                assert options[f"--{section}.{f.name}"].choices == list(typing.get_args(hints[f.name]))
    assert options["--wandb"].choices == ["offline", "online", "disabled"]
    with pytest.raises(SystemExit) as e:  # argparse: "invalid choice", before any work
        train.build_parser().parse_args(["meta-train", "--meta.estimator", "sgd"])
    assert e.value.code == 2


def test_literal_choices_are_checked_in_config_files_too():
    with pytest.raises(ConfigError, match=r"meta.estimator must be one of 'tbptt', 'es', 'pes', got 'sgd'"):
        RunConfig.from_dict({"meta": {"estimator": "sgd"}})
    with pytest.raises(ConfigError, match="gen.approval must be one of"):
        GenConfig(approval="never")
    with pytest.raises(ConfigError, match="wandb must be one of"):
        RunConfig(wandb="off")


def test_literal_types_match_the_names_the_code_dispatches_on():
    from meta.estimators import ESTIMATORS
    from meta.unroll import META_LOSSES
    from tasks.base import SPLITS

    hints = typing.get_type_hints(MetaConfig)
    assert typing.get_args(hints["estimator"]) == tuple(ESTIMATORS)
    assert typing.get_args(hints["meta_loss"]) == META_LOSSES
    assert typing.get_args(Split) == SPLITS == typing.get_args(typing.get_type_hints(EvalConfig)["split"])


@dataclass(frozen=True)
class _NewSection:
    """A section as a newcomer would extend it."""

    # ---- a section rule, not a comment of the next field ----
    # several lines above
    # a field
    curated: int = 3
    mode: Literal["a", "b"] = "a"  # which mode
    scales: tuple[float, ...] = (1.0, 2.0)  # per-task scales
    plain: bool = False


def test_a_new_field_gets_its_flag_type_choices_and_help_without_editing_train_py():
    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser.add_argument_group("new"), _NewSection, _NewSection(), prefix="new.")
    options = {s: a for a in parser._actions for s in a.option_strings}
    assert options["--new.mode"].choices == ["a", "b"]
    assert options["--new.curated"].help == "several lines above a field (default preset: 3)"
    assert options["--new.scales"].help == "per-task scales (default preset: 1.0,2.0)"
    assert options["--new.plain"].help == "(default preset: false)"
    args = parser.parse_args(["--new.curated", "5", "--new.mode", "b"])
    assert vars(args) == {"cfg:new.curated": "5", "cfg:new.mode": "b", "cfg:new.scales": None, "cfg:new.plain": None}


def test_field_comments_of_the_real_sections():
    assert field_comments(MetaConfig)["population"] == "task slots stepped per outer step"
    assert field_comments(MetaConfig)["outer_lr"] == ""  # no comment: no made-up help
    assert field_comments(GenConfig)["patience"].startswith("diminishing returns")  # the block above it


@pytest.mark.parametrize("text,hint,value", [
    ("4", int, 4), ("0.5", float, 0.5), ("1", float, 1.0), ("x", str, "x"),
    ("true", bool, True), ("On", bool, True), ("0", bool, False), ("no", bool, False),
    ("1e-3, 1e-2", tuple[float, ...], (1e-3, 1e-2)), ("", tuple[float, ...], ()), ("a,b", tuple[str, ...], ("a", "b")),
    ("es", Literal["tbptt", "es"], "es"),
])
def test_parse_value_by_annotation(text, hint, value):
    parsed = parse_value(text, hint)
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("text,hint", [("zero", int), ("2.5", int), ("maybe", bool), ("1,x", tuple[float, ...]),
                                       ("sgd", Literal["tbptt", "es"])])
def test_parse_value_rejects_what_does_not_parse(text, hint):
    with pytest.raises(ValueError):
        parse_value(text, hint)


@pytest.mark.parametrize("hint", [dict[str, int], int | None, list[int], tuple[int, int]])
def test_an_annotation_without_a_parser_fails_when_the_cli_is_built(hint):
    with pytest.raises(TypeError, match="no command-line parser"):
        check_supported(hint, "new.field")


# ---- one base class for user errors, caught once ----------------------------------------------------
def test_every_user_error_derives_from_the_base_and_keeps_its_old_base():
    from meta.lineage import LineageError
    from meta.safety import GoalError
    from meta.trainer import MetaTrainingError
    from optimizers.checkpoint import CheckpointError
    from tasks.base import TaskConfigError
    from tasks.data import DatasetError

    for cls, old in ((ConfigError, ValueError), (CheckpointError, RuntimeError), (TaskConfigError, ValueError),
                     (DatasetError, FileNotFoundError), (LineageError, RuntimeError), (GoalError, LineageError),
                     (MetaTrainingError, RuntimeError)):
        assert issubclass(cls, UserError) and issubclass(cls, old), cls
    assert MetaTrainingError("x").exit_status == 3 and ConfigError("x").exit_status == 2


def _no_traceback(err: str) -> None:
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_a_bad_config_file_exits_with_its_message(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"meta": {"estimator": "sgd"}}))
    assert train.main(["meta-train", "--config", str(path), "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: meta.estimator must be one of") and "'sgd'" in err
    _no_traceback(err)


def test_a_missing_checkpoint_exits_with_its_message(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "checkpoint"
    assert train.main(["evaluate", "--preset", "smoke", "--procs", "1", "--checkpoint", str(missing),
                       "--out-dir", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err
    _no_traceback(err)


def test_a_bad_flag_value_exits_with_a_message_naming_the_flag(tmp_path, capsys):
    assert train.main(["meta-train", "--preset", "smoke", "--out-dir", str(tmp_path / "run"),
                       "--gen.control", "maybe"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bad value for --gen.control: expected a boolean") and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    assert train.main(["meta-train", "--preset", "smoke", "--checkpoint-every", "often"]) == 2
    assert "bad value for --checkpoint-every" in capsys.readouterr().err
