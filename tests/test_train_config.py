"""One resolution of training requests: `g2is warmup`, `g2is train` and `g2is run` ([warmup] and
[finetune]) give the same TrainConfig for every override; a rank override keeps the preset's
LoRA scaling; bad hyper-parameters are refused with the parameter (or flag) named."""

import math

import pytest

from g2is_jax.cli import build_parser
from g2is_jax.cli.warmup import train_config_from_args
from g2is_jax.errors import G2ISError
from g2is_jax.runconfig import load_run_config
from g2is_jax.train import TRAIN_OVERRIDES, TRAIN_PRESETS, TrainConfig, resolve_train_config

# One value per override, each different from every preset's.
VALUES = {"fraction": "0.3", "epochs": "5", "learning_rate": "0.001", "schedule": "cosine",
          "warmup_ratio": "0.1", "weight_decay": "0.01", "batch_size": "2", "grad_accum": "3",
          "max_length": "96", "seed": "7", "lora_rank": "8", "lora_alpha": "24",
          "lora_dropout": "0.05", "lora_targets": "q,v,gate"}
MAX_LENGTH = 64


def test_every_override_has_a_value():
    assert set(VALUES) == set(TRAIN_OVERRIDES)


def _flag(name: str) -> str:
    return "--lr" if name == "learning_rate" else "--" + name.replace("_", "-")


def _cli(command: str, preset: str, over: dict[str, str]) -> TrainConfig:
    argv = [command, "--data", "d.jsonl", "--out", "o", "--preset", preset]
    over = {"max_length": str(MAX_LENGTH), **over}
    for name, value in over.items():
        argv += [_flag(name), value]
    return train_config_from_args(build_parser().parse_args(argv))


def _run(section: str, preset: str, over: dict[str, str]) -> TrainConfig:
    ml = over.get("max_length", str(MAX_LENGTH))
    sets = ["suite.seed=0", f"max_length={ml}", f"{section}.preset={preset}"]
    sets += [f"{section}.{k}={v}" for k, v in over.items() if k != "max_length"]
    cfg = load_run_config(None, sets)
    return getattr(cfg, section).train_config(cfg.max_length)


@pytest.mark.parametrize("preset", sorted(TRAIN_PRESETS))
@pytest.mark.parametrize("name", [None, *TRAIN_OVERRIDES, "lora_rank+lora_alpha"])
def test_every_door_resolves_the_same(preset, name):
    if name is None:
        over = {}
    else:
        over = {k: VALUES[k] for k in name.split("+")}
    got = {door: fn(preset, over) for door, fn in (
        ("g2is warmup", lambda p, o: _cli("warmup", p, o)),
        ("g2is train", lambda p, o: _cli("train", p, o)),
        ("g2is run [warmup]", lambda p, o: _run("warmup", p, o)),
        ("g2is run [finetune]", lambda p, o: _run("finetune", p, o)),
    )}
    want = got["g2is warmup"]
    for door, cfg in got.items():
        assert cfg == want, f"{door} resolves {name} differently: {cfg} vs {want}"
    base = TRAIN_PRESETS[preset]
    if name in (None, "lora_rank"):
        assert want.lora.scaling == pytest.approx(base.lora.scaling)
    if name == "lora_rank+lora_alpha":
        assert (want.lora.rank, want.lora.alpha) == (8, 24.0)  # an explicit alpha wins


def test_rank_override_keeps_the_presets_scaling():
    """Issue 11: preset less with rank 8 gave alpha 512 (scaling 64) through `g2is warmup` and
    alpha 32 (scaling 4) through `g2is run`. Both now keep less's scaling 512/128 = 4."""
    cli = _cli("warmup", "less", {"lora_rank": "8"})
    run = _run("warmup", "less", {"lora_rank": "8"})
    assert cli.lora == run.lora
    assert (cli.lora.rank, cli.lora.alpha, cli.lora.scaling) == (8, 32.0, 4.0)
    assert resolve_train_config("less", lora_rank=8).lora.alpha == 32.0


@pytest.mark.parametrize("field, value, match", [
    ("learning_rate", math.nan, "learning_rate must be a finite number"),
    ("learning_rate", math.inf, "learning_rate must be a finite number"),
    ("learning_rate", 0.0, "learning_rate must be a finite number in \\(0, inf\\)"),
    ("learning_rate", -1e-4, "learning_rate"),
    ("fraction", math.nan, "fraction"),
    ("fraction", 0.0, "fraction"),
    ("warmup_ratio", 1.0, "warmup_ratio"),
    ("warmup_ratio", math.nan, "warmup_ratio"),
    ("weight_decay", -0.1, "weight_decay"),
    ("weight_decay", math.inf, "weight_decay"),
    ("epochs", 0, "epochs must be an integer"),
    ("batch_size", 0, "batch_size"),
    ("grad_accum", 0, "grad_accum"),
    ("max_length", 1, "max_length"),
    ("seed", -1, "seed"),
    ("lora_rank", 0, "lora_rank"),
    ("lora_alpha", math.nan, "lora.alpha"),
    ("lora_alpha", -2.0, "lora.alpha"),
    ("lora_dropout", math.nan, "dropout"),
    ("lora_targets", "q,zz", "unknown LoRA target"),
])
def test_bad_hyper_parameters_are_refused(field, value, match):
    with pytest.raises(G2ISError, match=match):
        resolve_train_config("cpu", **{field: value})


def test_cli_names_the_flag(capsys):
    from g2is_jax.cli import main

    assert main(["warmup", "--data", "d.jsonl", "--out", "o", "--lr", "nan"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("g2is warmup: error: --lr must be a finite number") and \
        err.count("\n") == 1
