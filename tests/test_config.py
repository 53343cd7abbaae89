"""Schedules and configuration (afd_fast.config, afd_fast.schedule): the rates the optimizers get step by
step against hand-written schedules, recipes and their milestones, config files and their round trip,
bad input, and --resume refusing another run. Runs are tiny (resnet20 at 16 px, 2 steps of 4 images per epoch)."""
import json
import os
import shutil

import pytest
import torch
import yaml

from afd_fast import config, train
from afd_fast.data import synthetic_image_folder
from afd_fast.data.dali import dali_available
from afd_fast.errors import CheckpointError
from afd_fast.models import build_network
from afd_fast.schedule import Schedule
from afd_fast.step import DualStep


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8 training images (2 steps of 4 per epoch), 4 for validation, 16 px."""
    return synthetic_image_folder(str(tmp_path_factory.mktemp("data") / "tiny16"), num_classes=4,
                                  train_per_class=2, val_per_class=1, size=16)


def _argv(data, out, *extra):
    return ["--data", data, "--output", str(out), "--workers", "0", "--batch-size", "4", "--image-size", "16",
            "--loader", "torch", "--device", "cpu", "--print-every", "1000", *extra]


@pytest.fixture
def applied(monkeypatch):
    """The learning rates each training step ran with, read from its optimizers when it is called."""
    seen = []
    call = DualStep.__call__

    def recording(self, images, target, *turn):
        seen.append({name: (opt.param_groups[0]["lr"], float(opt.param_groups[0]["lr"]))
                     for name, opt in self.optimizers.items()})
        seen[-1]["step"] = self
        return call(self, images, target, *turn)

    monkeypatch.setattr(DualStep, "__call__", recording)
    return seen


def _rates(seen, name):
    return [s[name][1] for s in seen]


# --- the rates the optimizers get -------------------------------------------------------------------------

def test_step_schedule_with_warmup_in_device_tensors(tmp_path, data, applied, capsys):
    """--milestones, --lr-decay, --warmup-epochs and the Adam side's --adv-milestones, --adv-lr-decay:
    3 epochs of 2 steps, warm-up over the first epoch (2 steps). fp16 steps with torch's fused
    optimizers, whose rates are device tensors: filled in place, the same tensor every step."""
    train.main(_argv(data, tmp_path, "--epochs", "3", "--amp", "fp16", "--lr", "0.1", "--milestones", "1,2",
                     "--lr-decay", "0.5", "--warmup-epochs", "1", "--adv-lr", "0.001", "--adv-milestones", "2",
                     "--adv-lr-decay", "0.1", "--print-every", "1"))
    assert _rates(applied, "logit") == pytest.approx([0.05, 0.1, 0.05, 0.05, 0.025, 0.025], rel=1e-6)
    for name in ("generator", "discriminator"):
        assert _rates(applied, name) == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3, 1e-4, 1e-4], rel=1e-6)
    for name in ("logit", "generator", "discriminator"):
        tensors = [s[name][0] for s in applied]
        assert isinstance(tensors[0], torch.Tensor) and all(t is tensors[0] for t in tensors), name
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["lr"] for r in records] == pytest.approx([0.1, 0.05, 0.025])  # each epoch's last step
    assert [r["adv_lr"] for r in records] == pytest.approx([1e-3, 1e-3, 1e-4])
    out = capsys.readouterr().out
    assert "step 1/6 loss" in out and " lr 0.05 " in out.splitlines()[[i for i, line in enumerate(
        out.splitlines()) if "step 1/6" in line][0]]
    assert "schedule: 3 epochs; SGD 0.1, x0.5 at epochs 1, 2, linear warm-up over 1 epochs" in out


def test_cosine_schedule_and_optimizer_flags_round_trip_through_config_yaml(tmp_path, data, applied):
    """--lr-schedule cosine with --warmup-epochs (both optimizers), --momentum, --nesterov,
    --label-smoothing, --weight-decay reach the step; <output>/config.yaml given to --config is the
    same run, bit for bit on the CPU."""
    flags = ["--epochs", "3", "--lr", "0.2", "--lr-schedule", "cosine", "--warmup-epochs", "1", "--adv-lr", "1e-3",
             "--momentum", "0.8", "--nesterov", "--label-smoothing", "0.1", "--weight-decay", "3e-4", "--seed", "5"]
    first = train.main(_argv(data, tmp_path / "a", *flags))
    # warm-up: steps 0-1 at 1/2, 2/2; cosine over steps 2..6: (1 + cos(pi * p)) / 2 for p = 0, 1/4, 1/2, 3/4
    cosine = [0.5, 1.0, 1.0, 0.8535533906, 0.5, 0.1464466094]
    assert _rates(applied, "logit") == pytest.approx([0.2 * c for c in cosine], rel=1e-6)
    assert _rates(applied, "generator") == pytest.approx([1e-3 * c for c in cosine], rel=1e-6)
    step = applied[0]["step"]
    sgd = step.optimizers["logit"].param_groups[0]
    assert (sgd["momentum"], sgd["nesterov"], sgd["weight_decay"]) == (0.8, True, 3e-4)
    assert step.model.label_smoothing == 0.1

    written = yaml.safe_load(open(tmp_path / "a" / "config.yaml"))
    assert (written["lr_schedule"], written["warmup_epochs"], written["milestones"]) == ("cosine", 1.0, [])
    applied.clear()
    again = train.main(["--config", str(tmp_path / "a" / "config.yaml"), "--output", str(tmp_path / "b")])
    assert _rates(applied, "logit") == pytest.approx([0.2 * c for c in cosine], rel=1e-6)
    first.pop("img_per_s"), again.pop("img_per_s")
    assert again == first
    for i in range(2):
        a = torch.load(tmp_path / "a" / f"network{i}_resnet20.pt", weights_only=True)
        b = torch.load(tmp_path / "b" / f"network{i}_resnet20.pt", weights_only=True)
        assert all(torch.equal(a[n], b[n]) for n in a), i
    rewritten = yaml.safe_load(open(tmp_path / "b" / "config.yaml"))
    assert rewritten == {**written, "output": str(tmp_path / "b")}


def test_label_smoothing_reaches_the_cross_entropy():
    from afd_fast.model import AFDModel

    torch.manual_seed(0)
    model = AFDModel([build_network("resnet20", 10) for _ in range(2)], "vanilla", "pair", 16, label_smoothing=0.2)
    images, target = torch.randn(4, 3, 16, 16), torch.tensor([0, 3, 5, 9])
    model.eval()  # the running statistics on both sides
    out = model(images, target)
    for k, net in enumerate(model.networks):
        expected = torch.nn.functional.cross_entropy(net(images)[1], target, label_smoothing=0.2)
        torch.testing.assert_close(out["ce"][k], expected, rtol=1e-5, atol=1e-6)


# --- recipes -------------------------------------------------------------------------------------------

def _config(*argv, world_size=1, **kwargs):
    flags = vars(config.build_parser().parse_args(["--device", "cpu", *argv]))
    return config.resolve(flags, world_size=world_size, **kwargs)


@pytest.mark.parametrize("epochs,milestones,adv", [(300, (150, 225), (75, 150)), (30, (15, 23), (8, 15)),
                                                   (3, (2,), (1, 2)), (1, (), ())])
def test_recipe_milestones_follow_epochs(epochs, milestones, adv):
    """cifar-paper's 150/225 (Adam: 75/150) of 300 epochs scaled to --epochs, to the nearest epoch
    (halves up); those that fall on the end of the run are left out, two on one epoch merge."""
    c = _config("--recipe", "cifar-paper", "--epochs", str(epochs))
    assert (c.milestones, c.adv_milestones) == (milestones, adv)


def test_explicit_milestones_are_not_scaled():
    c = _config("--recipe", "cifar-paper", "--epochs", "30", "--milestones", "10,20")
    assert (c.milestones, c.adv_milestones) == ((10, 20), (8, 15))


def test_recipe_choice_for_image_folders(tmp_path, data):
    """An image folder (not CIFAR) with ImageNet networks: imagenet-scratch without --pretrained,
    imagenet-paper with it; CIFAR networks and CIFAR itself: cifar-paper; no data: quick."""
    archs = ["--arch", "resnet18,resnet34", "--data", data]
    scratch = _config(*archs)
    assert (scratch.recipe, scratch.epochs, scratch.milestones, scratch.image_size) == ("imagenet-scratch", 90,
                                                                                       (30, 60), 224)
    assert scratch.effective_lr == pytest.approx(0.1) and "without --pretrained" in scratch.recipe_reason
    weights = []
    for i, arch in enumerate(("resnet18", "resnet34")):
        weights.append(str(tmp_path / f"{arch}.pt"))
        torch.save(build_network(arch, 4).state_dict(), weights[-1])
    tuned = _config(*archs, "--pretrained", ",".join(weights))
    assert (tuned.recipe, tuned.epochs, tuned.lr) == ("imagenet-paper", 30, 0.01)
    assert "with --pretrained" in tuned.recipe_reason
    assert _config("--data", data).recipe == "cifar-paper"  # resnet20: the paper's CIFAR networks
    cifar = tmp_path / "cifar-100-python"
    cifar.mkdir()
    for name in ("train", "test", "meta"):
        (cifar / name).write_bytes(b"")
    assert _config(*archs[:2], "--data", str(tmp_path)).recipe == "cifar-paper"
    assert _config().recipe == "quick"


def test_linear_scaling_of_imagenet_scratch_and_the_global_batch():
    c = _config("--recipe", "imagenet-scratch", "--arch", "resnet18,resnet18", "--batch-size", "1024", world_size=8)
    assert (c.batch_size, c.batch_per_process, c.effective_lr, c.lr) == (1024, 128, pytest.approx(0.4), 0.1)
    assert c.schedules()["logit"].base == pytest.approx(0.4) and c.schedules()["generator"].base == 2e-5


def test_a_recipe_file_of_ones_own(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("epochs: 10\nbatch_size: 64\nlr: 0.2\nweight_decay: 5.0e-4\nadv_lr: 1.0e-4\nimage_size: 32\n"
                    "milestones: [5]\nwarmup_epochs: 1\n")
    c = _config("--recipe", str(path), "--epochs", "20")
    assert (c.recipe, c.epochs, c.lr, c.milestones, c.warmup_epochs) == (str(path), 20, 0.2, (10,), 1.0)


def test_shipped_recipes_are_package_files():
    assert set(config.recipe_names()) >= {"cifar-paper", "imagenet-paper", "imagenet-scratch", "imagenet-strong", "quick"}
    for name in config.recipe_names():
        label, settings = config.load_recipe(name)
        assert label == name and os.path.isfile(os.path.join(config.RECIPE_DIR, f"{name}.yaml"))


def test_imagenet_strong_is_torchvisions_new_recipe_and_only_chosen_by_name(tmp_path, data):
    """torchvision's ResNet "new recipe" (2021): its numbers, linear scaling from batch 1024, its EMA
    (decay 0.99998 every 32 steps, adjusted by torchvision's train.py to 1 - 2e-5 * 1024 * 32 / 600 per
    update); never picked without --recipe."""
    c = _config("--recipe", "imagenet-strong", "--arch", "resnet50,resnet50", "--batch-size", "512", world_size=4)
    assert (c.epochs, c.batch_size, c.recipe_batch, c.lr, c.lr_scaling, c.effective_lr) == (
        600, 512, 1024, 0.5, "linear", pytest.approx(0.25))
    assert (c.momentum, c.nesterov, c.weight_decay, c.norm_weight_decay, c.bias_weight_decay) == (0.9, False, 2e-5,
                                                                                                 0.0, None)
    assert (c.lr_schedule, c.warmup_epochs, c.milestones, c.label_smoothing) == ("cosine", 5.0, (), 0.1)
    assert (c.mixup, c.cutmix, c.mix_prob, c.mix_switch_prob, c.auto_augment, c.random_erasing) == (
        0.2, 1.0, 1.0, 0.5, "trivialaugment", 0.1)
    prep = c.preparation
    assert (prep.train_crop, prep.val_resize, prep.val_crop) == (176, 232, 224)
    assert c.model_ema == pytest.approx(1 - 2e-5 * 1024 * 32 / 600, abs=1e-6) and c.model_ema_every == 32
    assert (c.adv_lr, c.adv_weight_decay, c.adv_milestones) == (2e-5, 0.1, ())
    adam = c.schedules()["generator"]
    assert (adam.kind, adam.warmup_epochs) == ("cosine", 5.0)  # the schedule kind is shared by both optimizers
    assert c.mixing is not None and "weight EMA 0.998908 every 32 step(s)" in c.describe_schedule()
    # --epochs shortens the cosine; the rest stays
    short = _config("--recipe", "imagenet-strong", "--epochs", "30")
    assert (short.epochs, short.warmup_epochs, short.mixup) == (30, 5.0, 0.2)
    # never chosen silently: every automatic choice is another recipe
    weights = str(tmp_path / "r18.pt")
    torch.save(build_network("resnet18", 4).state_dict(), weights)
    for extra in ([], ["--data", data], ["--data", data, "--arch", "resnet18,resnet18"],
                  ["--data", data, "--arch", "resnet18,resnet18", "--pretrained", f"{weights},{weights}"]):
        assert _config(*extra).recipe != "imagenet-strong"


def test_mixing_flags_from_a_config_file_and_a_recipe(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("mixup: 0.8\ncutmix: 1\nmix-prob: 0.5\nmix_switch_prob: 0.25\n")
    c = _config("--config", str(path), "--cutmix", "0")
    assert (c.mixup, c.cutmix, c.mix_prob, c.mix_switch_prob) == (0.8, 0.0, 0.5, 0.25)
    assert c.mixing.describe() == "mixup 0.8, of 0.5 of the batches"
    assert _config().mixing is None  # off by default
    assert yaml.safe_load(c.to_yaml())["mix_prob"] == 0.5
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("epochs: 2\nbatch_size: 8\nlr: 0.1\nweight_decay: 1e-4\nadv_lr: 1e-4\nimage_size: 32\n"
                      "cutmix: 1.0\n")
    from_recipe = _config("--recipe", str(recipe))
    assert (from_recipe.mixup, from_recipe.cutmix) == (0.0, 1.0)
    assert config.recipe_changes(_config("--recipe", str(recipe), "--mixup", "0.2")) == ["mixup 0.2 (recipe 0.0)"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("mixup: lots\n")
    with pytest.raises(config.ConfigError, match="mixup: expected a number"):
        _config("--config", str(bad))


# --- config files ------------------------------------------------------------------------------------------

def test_config_file_sets_flags_and_the_command_line_overrides_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr-schedule: cosine\nepochs: 12\nlr: 0.3\narch: [resnet20, wrn-16-2]\nseed: 7\n"
                    "weight_decay: 1e-4\n")  # (YAML 1.1 reads 1e-4 as a string: taken as the number)
    c = _config("--config", str(path), "--lr", "0.05")
    assert (c.lr_schedule, c.epochs, c.lr, c.arch, c.seed, c.milestones) == ("cosine", 12, 0.05,
                                                                            ("resnet20", "wrn-16-2"), 7, ())
    assert c.weight_decay == 1e-4


def test_print_config_prints_the_resolved_yaml_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert train.main(["--device", "cpu", "--output", str(out), "--epochs", "30", "--recipe", "cifar-paper",
                       "--print-config"]) == {}
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["epochs"], printed["milestones"], printed["output"]) == (30, [15, 23], str(out))
    assert printed == _config("--output", str(out), "--epochs", "30", "--recipe", "cifar-paper").settings()
    assert not out.exists()


@pytest.mark.parametrize("text,message", [
    ("epochs: 3\nlr_sheddule: cosine\n", "'lr_sheddule' is not a setting of afd_fast.train (did you mean "
                                        "'lr_schedule'?)"),
    ("epochs: three\n", "epochs: expected an integer, got 'three' (str)"),
    ("lr: [0.1]\n", "lr: expected a number, got [0.1] (list)"),
    ("nesterov: 1\n", "nesterov: expected true or false, got 1 (int)"),
    ("lr_schedule: linear\n", "lr_schedule: 'linear' is not one of step, cosine"),
    ("epochs: 3\n  lr: [\n", "is not YAML"),
    ("- epochs\n- 3\n", "is not a mapping of settings (it holds a list)"),
])
def test_bad_config_files_name_the_key_and_the_file(tmp_path, text, message, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit):
        train.parse_args(["--device", "cpu", "--config", str(path)])
    err = capsys.readouterr().err
    assert message in err and str(path) in err, err


@pytest.mark.parametrize("argv,message", [
    (["--recipe", "cifar-paper", "--milestones", "100,400"], "--milestones: milestone 400 is not inside the run"),
    (["--epochs", "10", "--milestones", "8,4"], "--milestones 8,4: the milestones must increase"),
    (["--epochs", "10", "--milestones", "5,5"], "the milestones must increase"),
    (["--epochs", "10", "--adv-milestones", "10"], "--adv-milestones: milestone 10 is not inside the run"),
    (["--epochs", "10", "--milestones", "2.5"], "--milestones: '2.5' is not an epoch number"),
    (["--lr-schedule", "cosine", "--milestones", "2"], "--milestones is for --lr-schedule step"),
    (["--epochs", "5", "--warmup-epochs", "5"], "--warmup-epochs 5 must be at least 0 and shorter than the run"),
    (["--label-smoothing", "1"], "--label-smoothing must lie in [0, 1), got 1"),
    (["--label-smoothing", "-0.1"], "--label-smoothing must lie in [0, 1)"),
    (["--lr", "0"], "--lr must be positive, got 0"),
    (["--lr", "-0.1"], "--lr must be positive, got -0.1"),
    (["--adv-lr", "0"], "--adv-lr must be positive"),
    (["--recipe", "cifar-papr"], "unknown recipe 'cifar-papr': give one of cifar-paper, imagenet-paper, "
                                 "imagenet-scratch, imagenet-strong, quick or a recipe's YAML file"),
    (["--mixup", "-0.2"], "--mixup is Beta's alpha (0: off), it must not be negative, got -0.2"),
    (["--cutmix", "-1"], "--cutmix is Beta's alpha (0: off), it must not be negative"),
    (["--mix-prob", "1.5"], "--mix-prob is a probability, in [0, 1], got 1.5"),
    (["--mix-switch-prob", "-0.1"], "--mix-switch-prob is a probability, in [0, 1]"),
    (["--nesterov", "--momentum", "0"], "--nesterov needs a positive --momentum"),
    (["--method", "kd-only", "--dml-update", "alternate"], "--dml-update alternate is DML's (--method dml)"),
    (["--model-ema", "1"], "--model-ema is the EMA's decay per update, in (0, 1)"),
    (["--model-ema", "0.9", "--model-ema-every", "0"], "--model-ema-every must be at least 1, got 0"),
    (["--bn-recalibrate", "-1"], "--bn-recalibrate is a number of batches (0: off), got -1"),
    (["--norm-weight-decay=-1e-4"], "--norm-weight-decay must not be negative"),
    (["--bias-weight-decay", "-1"], "--bias-weight-decay must not be negative"),
])
def test_bad_input_stops_with_a_message_and_writes_nothing(tmp_path, argv, message, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit:
        train.main(["--device", "cpu", "--output", str(out), *argv])
    assert exit.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_bad_value_from_a_config_file_names_the_file(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 10\nmilestones: [4, 12]\n")
    with pytest.raises(SystemExit):
        train.parse_args(["--device", "cpu", "--config", str(path)])
    assert f"--milestones (from {path}): milestone 12 is not inside the run" in capsys.readouterr().err


def test_schedule_rates_by_hand():
    """The same rules as the trainer runs, without a trainer: warm-up shorter than an epoch, a step
    schedule's milestones at epoch boundaries, the cosine's end."""
    s = Schedule(1.0, "step", milestones=(2, 3), decay=0.1, warmup_epochs=0.25, epochs=4)
    assert [s.rate(i, 8) for i in (0, 1, 2, 7, 15, 16, 23, 24, 31)] == pytest.approx(
        [0.5, 1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    c = Schedule(2.0, "cosine", epochs=2)
    assert [c.rate(i, 2) for i in range(4)] == pytest.approx([2.0, 1.7071067812, 1.0, 0.2928932188])


# --- resume ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("resume") / "run"
    train.main(_argv(data, out, "--epochs", "1", "--seed", "1"))
    return out


@pytest.mark.parametrize("extra,message", [
    (["--arch", "resnet20,wrn-16-2"], "--arch resnet20,resnet20 -> resnet20,wrn-16-2"),
    (["--method", "kd-only"], "--method afd -> kd-only"),
    (["--batch-size", "2"], "--batch-size 4 -> 2"),
    (["--image-size", "12"], "--image-size 16 -> 12"),
    pytest.param(["--loader", "dali"], "loader torch -> dali",
                 marks=pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")),
])
def test_resume_refuses_another_run(checkpointed, data, extra, message):
    before = {f: os.path.getmtime(checkpointed / f) for f in os.listdir(checkpointed)}
    argv = _argv(data, checkpointed, "--epochs", "2", "--seed", "1", *extra, "--resume")
    with pytest.raises(CheckpointError, match="is another run") as error:
        train.main(argv)
    assert message in str(error.value) and "config.yaml" in str(error.value)
    assert {f: os.path.getmtime(checkpointed / f) for f in os.listdir(checkpointed)} == before  # nothing written


def test_dml_update_defines_the_run():
    """The two DML forms train differently (and count epochs differently): --resume refuses a switch."""
    sync, alternate = _config("--method", "dml"), _config("--method", "dml", "--dml-update", "alternate")
    assert (sync.dml_update, alternate.dml_update) == ("sync", "alternate")
    refuse, _ = config.resume_differences(sync.settings(), alternate)
    assert refuse == ["--dml-update sync -> alternate"]


def test_the_ema_and_decay_by_kind_define_the_run_and_round_trip_through_config_yaml(tmp_path):
    """They shape the optimizers' groups and what a checkpoint holds: --resume refuses a change;
    config.yaml keeps them (and a recipe may set them), --bn-recalibrate is a setting of the run."""
    flags = ["--model-ema", "0.999", "--model-ema-every", "4", "--norm-weight-decay", "0", "--bias-weight-decay", "0",
             "--bn-recalibrate", "20"]
    on, off = _config(*flags), _config()
    assert (on.model_ema, on.model_ema_every, on.norm_weight_decay, on.bias_weight_decay, on.bn_recalibrate) == \
        (0.999, 4, 0.0, 0.0, 20)
    assert (off.model_ema, off.norm_weight_decay, off.bias_weight_decay, off.bn_recalibrate) == (None, None, None, 0)
    refuse, warn = config.resume_differences(off.settings(), on)
    assert refuse == ["--norm-weight-decay None -> 0.0", "--bias-weight-decay None -> 0.0", "--model-ema None -> 0.999",
                      "--model-ema-every 1 -> 4"] and warn == ["--bn-recalibrate 0 -> 20"]
    path = tmp_path / "config.yaml"
    path.write_text(on.to_yaml())
    assert config.resolve({}, str(path)).settings() == on.settings()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("epochs: 2\nbatch_size: 8\nlr: 0.1\nweight_decay: 1e-4\nadv_lr: 1e-4\nimage_size: 32\n"
                      "model_ema: 0.99\nnorm_weight_decay: 0.0\n")
    from_recipe = _config("--recipe", str(recipe))
    assert (from_recipe.model_ema, from_recipe.norm_weight_decay) == (0.99, 0.0)
    assert "weight EMA 0.99 every 1 step(s)" in from_recipe.describe_schedule()


def test_resume_names_other_changed_settings(checkpointed, data, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(checkpointed, out)
    summary = train.main(_argv(data, out, "--epochs", "2", "--seed", "1", "--print-every", "3", "--resume"))
    assert summary["steps"] == 4
    err = capsys.readouterr().err
    assert "resuming with changed settings: --epochs 1 -> 2" in err and "--print-every 1000 -> 3" in err, err
    assert yaml.safe_load(open(out / "config.yaml"))["epochs"] == 2
