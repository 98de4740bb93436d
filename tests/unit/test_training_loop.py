"""The generic training loop on the toy task: config, LR schedule, data order, logging, EMA, NaN steps."""

import dataclasses
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from latentforge.errors import ConfigError
from latentforge.training import checkpointing
from latentforge.training.config import (
    RunConfig,
    config_hash,
    dumps_toml,
    load_config,
    resolve_mixed_precision,
    save_config,
)
from latentforge.training.ema import EMA
from latentforge.training.logging import image_grid, read_log
from latentforge.training.loop import TrainingDiverged, lr_at, micro_batches, run_training, train
from training_toy import TeacherData, ToyOptions, ToyTask, make_toy_task


def toy_config(tmp_path, **fields) -> RunConfig:
    values = dict(run_dir=str(tmp_path / "run"), task="toy", max_steps=12, batch_size=8, lr=1e-2)
    values.update(checkpoint_every=4, log_every=1, device="cpu")
    return RunConfig(**(values | fields))


# ---------------------------------------------------------------------------- config


def test_config_from_toml_with_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('lr = 1\nbetas = [0.8, 0.9]\nrun_dir = "a"\n[task_options]\nhidden = 4\n')
    overrides = ["lr=3e-4", "run_dir=somewhere/else", "task_options.hidden=16", "task_options.sub.x=[1, 2]"]
    config = load_config(path, overrides)
    assert config.lr == 3e-4 and isinstance(config.lr, float)
    assert config.betas == (0.8, 0.9)
    assert config.run_dir == "somewhere/else"
    assert config.task_options == {"hidden": 16, "sub": {"x": [1, 2]}}
    assert load_config(path).lr == 1.0  # an int is accepted for a float field


def test_config_round_trips_through_written_toml(tmp_path):
    config = RunConfig(
        run_dir='odd "dir"\\x', lr=2.5e-5, min_lr=0.0, task_options={"a": {"b": [1, "c"]}, "d": 1.5}
    )
    save_config(config, tmp_path / "config.toml")
    again = load_config(tmp_path / "config.toml")
    assert again == config
    assert config_hash(again) == config_hash(config)
    assert "[task_options.a]" in dumps_toml(config.to_dict())


def test_config_errors_teach(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config keys \['lrate'\].*known keys: run_dir, task"):
        load_config(None, ["lrate=1"])
    with pytest.raises(ConfigError, match=r"^command-line override: max_steps = 1.5: expected an integer$"):
        load_config(None, ["max_steps=1.5"])
    with pytest.raises(ConfigError, match="lr_schedule = 'linear': valid values are cosine, constant"):
        load_config(None, ["lr_schedule=linear"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["lr"])
    path = tmp_path / "c.toml"
    path.write_text("lr = [1\n")
    with pytest.raises(ConfigError, match=rf"^{path}: not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'missing.toml'}: cannot read the config file"):
        load_config(tmp_path / "missing.toml")


# Every numeric RunConfig field with a value just outside its range (the probes of issue 19 among them).
OUT_OF_RANGE = [
    ("grad_clip", "-1", "a finite number >= 0 (0 = off)"),
    ("lr", "0", "a finite number > 0"),
    ("lr", "nan", "a finite number > 0"),
    ("lr", "inf", "a finite number > 0"),
    ("batch_size", "0", "a finite number >= 1"),
    ("grad_accum", "0", "a finite number >= 1"),
    ("max_steps", "-1", "a finite number >= 0"),
    ("warmup_steps", "-5", "a finite number >= 0"),
    ("min_lr", "-1e-6", "a finite number >= 0"),
    ("weight_decay", "-0.1", "a finite number >= 0"),
    ("betas", "[0.9, 1.0]", "a finite number >= 0 and < 1"),
    ("ema_decay", "1.0", "a finite number >= 0 and < 1 (0 = off)"),
    ("ema_start", "-1", "a finite number >= 0"),
    ("checkpoint_every", "-1", "a finite number >= 0 (0 = only at the end)"),
    ("keep_checkpoints", "-2", "a finite number >= 0 (0 = keep all)"),
    ("eval_every", "-1", "a finite number >= 0 (0 = only at the end)"),
    ("sample_every", "-1", "a finite number >= 0 (0 = only at the end)"),
    ("log_every", "0", "a finite number >= 1"),
    ("num_workers", "-1", "a finite number >= 0"),
    ("max_nan_steps", "0", "a finite number >= 1"),
    ("seed", "-3", "a finite number >= 0 and <= 9.22337e+18"),
]


@pytest.mark.parametrize(("key", "value", "valid"), OUT_OF_RANGE)
def test_every_numeric_field_is_range_checked_naming_file_key_value_and_range(tmp_path, key, value, valid):
    path = tmp_path / "c.toml"
    path.write_text(f"{key} = {value}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: {key} = ") and message.endswith(f"is out of range: valid is {valid}")
    assert "\n" not in message
    with pytest.raises(ConfigError, match=f"^command-line override: {key} = "):
        load_config(None, [f"{key}={value}"])


def test_range_rules_cover_every_numeric_field():
    numeric = [
        f.name for f in dataclasses.fields(RunConfig) if f.type in ("int", "float", "tuple[float, float]")
    ]
    assert sorted(numeric) == sorted({key for key, _, _ in OUT_OF_RANGE} - {"lr"} | {"lr"})
    assert load_config(None, ["grad_clip=0", "ema_decay=0", "min_lr=1e-4", "lr=1e-4"]).grad_clip == 0.0
    with pytest.raises(ConfigError, match=r"min_lr = 0.1 is above lr = 0.01"):
        load_config(None, ["min_lr=0.1", "lr=0.01"])


# ---------------------------------------------------------------------------- LR schedule


def test_lr_schedule_warmup_cosine_and_constant():
    config = RunConfig(lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=104)
    assert [lr_at(s, config) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lr_at(4, config) == 1.0  # warmup ends at the peak
    assert lr_at(54, config) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(104, config) == pytest.approx(0.1) and lr_at(500, config) == pytest.approx(0.1)
    values = [lr_at(s, config) for s in range(4, 105)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    constant = RunConfig(lr=1.0, warmup_steps=2, lr_schedule="constant", max_steps=10)
    assert [lr_at(s, constant) for s in (0, 1, 2, 9)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])


# ---------------------------------------------------------------------------- data order


def _indices(stream, steps):
    return [[batch["index"].tolist() for batch in next(stream)] for _ in range(steps)]


def test_data_order_is_a_function_of_seed_and_step_not_of_processes():
    data, config = TeacherData(36, 2, 0), RunConfig(batch_size=8, grad_accum=2, seed=3)
    one = _indices(micro_batches(data, config, 0, 1, 0), 9)  # 4 steps per epoch: 4 items dropped
    for epoch in range(2):
        items = [i for step in one[4 * epoch : 4 * epoch + 4] for micro in step for i in micro]
        assert len(items) == 32 == len(set(items))  # no item twice within an epoch
    assert one[0] != one[4]  # a new permutation each epoch
    single = RunConfig(batch_size=8, grad_accum=1, seed=3)
    rank0, rank1 = (_indices(micro_batches(data, single, r, 2, 0), 9) for r in (0, 1))
    assert [[a[0], b[0]] for a, b in zip(rank0, rank1, strict=True)] == one  # micro g = rank * accum + a
    assert _indices(micro_batches(data, config, 0, 1, 5), 4) == one[5:9]  # resume mid-epoch


# ---------------------------------------------------------------------------- training


def test_loss_decreases_and_run_dir_layout(tmp_path):
    config = toy_config(tmp_path, max_steps=60, log_every=10, eval_every=30, sample_every=30)
    config.checkpoint_every, config.keep_checkpoints = 10, 2
    artefact = train(make_toy_task(config), config)
    run = tmp_path / "run"
    rows = [row for row in read_log(run / "log.csv") if row["loss"]]
    assert [int(row["step"]) for row in rows] == [10, 20, 30, 40, 50, 60]
    assert float(rows[-1]["loss"]) < 0.5 * float(rows[0]["loss"])
    assert {row["step"] for row in read_log(run / "log.csv") if row["eval/mse"]} == {"30", "60"}
    assert artefact == run / "final.safetensors"
    assert sorted(load_file(artefact)) == ["0.bias", "0.weight", "3.bias", "3.weight"]
    assert [step for step, _ in checkpointing.list_checkpoints(run)] == [50, 60]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_30.png", "step_60.png"]
    assert load_config(run / "config.toml") == config


def test_finished_run_resumes_to_export_only(tmp_path):
    config = toy_config(tmp_path, max_steps=4)
    train(make_toy_task(config), config)
    task = make_toy_task(config)
    train(task, config)
    assert task.calls == 0


def test_nan_steps_are_skipped_and_logged(tmp_path):
    config = toy_config(tmp_path, max_steps=10, task_options={"nan_steps": [3, 4, 7]})
    train(make_toy_task(config), config)
    rows = read_log(tmp_path / "run" / "log.csv")
    assert [int(r["step"]) for r in rows if r["skipped"] == "1.0"] == [4, 5, 8]
    assert all(math.isnan(float(r["loss"])) for r in rows if r["skipped"] == "1.0")
    state = checkpointing.load_checkpoint(tmp_path / "run" / "checkpoints" / "step_10.pt")
    assert state["optimizer"]["state"][0]["step"].item() == 7  # 10 steps, 3 without an update
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_consecutive_nans_stop_the_run_and_keep_the_last_checkpoint(tmp_path):
    config = toy_config(
        tmp_path, max_steps=20, max_nan_steps=3, task_options={"nan_steps": list(range(5, 20))}
    )
    with pytest.raises(TrainingDiverged, match=r"loss was not finite at steps 6-8 \(3 in a row.*lower lr"):
        train(make_toy_task(config), config)
    run = tmp_path / "run"
    assert [step for step, _ in checkpointing.list_checkpoints(run)] == [
        4
    ]  # stopped at step 8, before saving it
    state = checkpointing.load_checkpoint(run / "checkpoints" / "step_4.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (run / "final.safetensors").exists()
    assert read_log(run / "log.csv")[-1]["step"] == "8"


def test_resume_refuses_changed_settings_and_accepts_harmless_ones(tmp_path):
    config = toy_config(tmp_path, max_steps=4)
    train(make_toy_task(config), config)
    changed = toy_config(tmp_path, max_steps=4, lr=5e-3, task_options={"hidden": 16})
    with pytest.raises(ValueError, match=r"(?s)lr: 0.01 -> 0.005.*task_options"):
        train(make_toy_task(changed), changed)
    assert load_config(tmp_path / "run" / "config.toml").lr == 0.01  # the refused config is not written
    harmless = toy_config(tmp_path, max_steps=4, log_every=3, checkpoint_every=2, num_workers=0)
    train(make_toy_task(harmless), harmless)


def test_resume_skips_a_damaged_checkpoint_and_removes_temp_files(tmp_path):
    config = toy_config(tmp_path, max_steps=8)
    train(make_toy_task(config), config)
    folder = tmp_path / "run" / "checkpoints"
    (folder / "step_8.pt").write_bytes(b"not a checkpoint")
    (folder / "step_12.pt.tmp").write_bytes(b"half written")
    task = make_toy_task(config)
    with pytest.warns(UserWarning, match="step_8.pt .step 8. does not load"):
        train(task, config)
    assert task.calls == 4  # steps 4..7 again, from step_4.pt
    assert not (folder / "step_12.pt.tmp").exists()


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    import random

    import numpy as np

    checkpointing.atomic_save({"rng": checkpointing.rng_state()}, tmp_path / "r.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    checkpointing.set_rng_state(checkpointing.load_checkpoint(tmp_path / "r.pt")["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and (expected[1] == again[1]).all() and expected[2] == again[2]


def test_ema_follows_then_averages():
    model = nn.Linear(2, 1)
    ema = EMA(model, decay=0.75, start=1)
    with torch.no_grad():
        model.weight.fill_(4.0)
    ema.update(model, step=0)  # before `start`: a copy
    assert torch.equal(ema.module.weight, model.weight)
    with torch.no_grad():
        model.weight.fill_(8.0)
    ema.update(model, step=1)
    assert torch.allclose(ema.module.weight, torch.full_like(model.weight, 5.0))
    assert not ema.module.weight.requires_grad


def test_run_training_maps_task_names(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(f'run_dir = "{tmp_path / "run"}"\nmax_steps = 2\nbatch_size = 4\ndevice = "cpu"\n')
    artefact = run_training("toy", path, ["log_every=1"], tasks={"toy": make_toy_task})
    assert artefact.exists()
    with pytest.raises(ValueError, match="unknown task 'vae'; known tasks: toy"):
        run_training("vae", path, tasks={"toy": make_toy_task})
    path.write_text('task = "clip"\n')
    with pytest.raises(ConfigError, match=f"^{path}: task = 'clip', but 'toy' was asked for"):
        run_training("toy", path, tasks={"toy": make_toy_task})


def test_image_grid_tiles():
    from PIL import Image

    tiles = [Image.new("RGB", (2, 3), (i * 40, 0, 0)) for i in range(5)]
    grid = image_grid(tiles)
    assert (
        grid.size == (6, 6) and grid.getpixel((4, 0)) == (80, 0, 0) and grid.getpixel((2, 3)) == (160, 0, 0)
    )


def test_toy_task_sees_the_batch_it_is_given(tmp_path):
    task = ToyTask(ToyOptions(items=8))
    config = toy_config(tmp_path, max_steps=2, batch_size=4, grad_accum=2)
    task.grad_accum = 2
    train(task, config)
    assert len(task.seen) == 4 and all(len(micro) == 2 for micro in task.seen)


def test_bf16_autocast_trains(tmp_path):
    config = toy_config(tmp_path, max_steps=6, mixed_precision="bf16", lr=3e-2)
    train(make_toy_task(config), config)
    losses = [float(row["loss"]) for row in read_log(tmp_path / "run" / "log.csv")]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def test_auto_precision_follows_the_cpu_and_then_the_checkpoint(tmp_path, monkeypatch):
    # Fresh run: "auto" becomes bf16 only where the CPU multiplies bf16 natively.
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert resolve_mixed_precision("auto", torch.device("cpu")) == ("bf16" if native else "no")
    assert resolve_mixed_precision("bf16", torch.device("cpu")) == "bf16"
    for flag, expected in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda flag=flag: flag)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert resolve_mixed_precision("auto", torch.device("cpu")) == expected
    # A run started in bf16 resumes in bf16 under "auto", even on a CPU that would now choose fp32.
    config = toy_config(tmp_path, max_steps=4, mixed_precision="bf16")
    train(make_toy_task(config), config)
    longer = toy_config(tmp_path, max_steps=4, mixed_precision="auto")
    train(make_toy_task(longer), longer)  # max_steps reached: resumes, checks exactness, writes config
    assert load_config(tmp_path / "run" / "config.toml").mixed_precision == "bf16"


def test_gradient_checkpointing_flag_is_set_or_warned(tmp_path):
    config = toy_config(tmp_path, max_steps=1, gradient_checkpointing=True)
    with pytest.warns(UserWarning, match="no submodule of Sequential has a `gradient_checkpointing` flag"):
        train(make_toy_task(config), config)


def test_a_checkpoint_that_does_not_read_back_prunes_nothing(tmp_path, monkeypatch):
    state = {key: 0 for key in checkpointing.REQUIRED_KEYS}
    for step in (1, 2):
        checkpointing.save_checkpoint(tmp_path, step, state | {"step": step}, keep=1)
    assert [s for s, _ in checkpointing.list_checkpoints(tmp_path)] == [2]
    real_save = checkpointing.atomic_save

    def save_garbage(obj, path):  # the write "succeeds" but the file is damaged
        real_save(obj, path)
        path.write_bytes(path.read_bytes()[:100])

    monkeypatch.setattr(checkpointing, "atomic_save", save_garbage)
    with pytest.warns(UserWarning, match="step_3.pt was written but does not load back"):
        checkpointing.save_checkpoint(tmp_path, 3, state | {"step": 3}, keep=1)
    assert [s for s, _ in checkpointing.list_checkpoints(tmp_path)] == [2, 3]  # step 2 still there


def test_log_is_appended_and_read_back_as_the_finished_run_saw_it(tmp_path):
    from latentforge.training.logging import CSVLog

    path = tmp_path / "log.csv"
    first = CSVLog(path)
    for step in (1, 2, 3):
        first.log(step, {"loss": float(step)})
    first.log(4, {"loss": 4.0, "eval/x": 0.5})  # a new column: a new header line, nothing rewritten
    written = path.read_bytes()
    resumed = CSVLog(path, resume_step=2)  # the attempt above was killed after step 4; checkpoint at 2
    resumed.log(3, {"loss": 3.5})
    assert path.read_bytes().startswith(written)
    rows = read_log(path)
    assert [(r["step"], r["loss"], r["eval/x"]) for r in rows] == [
        ("1", "1.0", ""),
        ("2", "2.0", ""),
        ("3", "3.5", ""),
    ]
    CSVLog(path, resume_step=0).log(1, {"loss": 9.0})  # a start from scratch voids every earlier row
    assert [(r["step"], r["loss"]) for r in read_log(path)] == [("1", "9.0")]


@pytest.mark.skipif(shutil.which("c++") is None, reason="inductor compiles C++: no compiler here")
def test_compile_trains_the_same_weights_as_eager(tmp_path, monkeypatch):
    """`compile = true` runs the step's forward and backward through torch.compile (inductor): the same
    training up to rounding, and a free-to-change setting (an eager run resumes compiled)."""
    compiled_modules = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled_modules.append(m) or real_compile(m, **kw))
    no_dropout = {"dropout": 0.0}  # compiled dropout draws its own random numbers
    eager = toy_config(tmp_path / "eager", max_steps=6, task_options=no_dropout)
    compiled = toy_config(tmp_path / "compiled", max_steps=6, compile=True, task_options=no_dropout)
    weights = {}
    for name, config in (("eager", eager), ("compiled", compiled)):
        weights[name] = load_file(train(make_toy_task(config), config))
    assert weights["eager"].keys() == weights["compiled"].keys()
    for key, value in weights["eager"].items():
        torch.testing.assert_close(weights["compiled"][key], value, rtol=1e-5, atol=1e-6)
    assert len(compiled_modules) == 1 and isinstance(compiled_modules[0], nn.Sequential)
    longer = dataclasses.replace(eager, max_steps=6, compile=True)
    train(make_toy_task(longer), longer)  # resumes the finished eager run: accepted
