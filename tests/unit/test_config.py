"""Config validation at the edge: every bad value names its field, the value and the fix."""

import subprocess
import sys

import pytest

from pipeline import recipes
from pipeline.cluster import check_resources
from schemas.errors import ConfigError


@pytest.mark.parametrize("override, field, words", [
    ("train.optimizer.momentum=1.0", "train.optimizer.momentum=1.0", "less than 1"),
    ("train.optimizer.momentum=-0.1", "train.optimizer.momentum=-0.1", "greater than or equal to 0"),
    ("train.optimizer.name=adam train.optimizer.beta1=1.0", "train.optimizer.beta1=1.0", "less than 1"),
    ("train.optimizer.name=adam train.optimizer.beta2=1.5", "train.optimizer.beta2=1.5", "less than 1"),
    ("train.optimizer.lr=0", "train.optimizer.lr=0", "greater than 0"),
    ("train.optimizer.lr=-1e-3", "train.optimizer.lr=-0.001", "greater than 0"),
    ("train.epochs=0", "train.epochs=0", "greater than or equal to 1"),
    ("train.batch_size=1", "train.batch_size=1", "at least 2 rows"),
    ("model.bn_eps=0", "train.model.bn_eps", None),
    ("tracking.gate.min_accuracy=2", "tracking.gate.min_accuracy=2", "less than or equal to 1"),
    ("train.early_stopping.patience=0", "train.early_stopping.patience=0", "greater than or equal to 1"),
    ("evaluate.curves.overfit_gap=0.5", "evaluate.curves.overfit_gap=0.5", "greater than 1"),
    ("evaluate.top_k=0", "evaluate.top_k=0", "greater than or equal to 1"),
])
def test_bad_values_name_field_value_and_range(override, field, words):
    if override.startswith("model."):
        override = "train." + override
    with pytest.raises(ConfigError) as e:
        recipes.load("digits", override.split())
    msg = str(e.value)
    assert field in msg
    if words:
        assert words in msg
    assert "\n" not in msg


def test_unknown_key_is_rejected_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"train.optimizr: unknown key; did you mean 'train.optimizer'"):
        recipes.load("digits", ["train.optimizr.lr=0.1"])
    with pytest.raises(ConfigError, match=r"train.optimizer.learning_rate: not a setting of the sgd optimizer"):
        recipes.load("digits", ["train.optimizer.learning_rate=0.1"])
    with pytest.raises(ConfigError, match=r"train.optimizer.momentun: .*did you mean 'train.optimizer.momentum'"):
        recipes.load("digits", ["train.optimizer.momentun=0.5"])


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="nesterov=true needs train.optimizer.momentum > 0"):
        recipes.load("digits", ["train.optimizer.nesterov=true", "train.optimizer.momentum=0"])
    with pytest.raises(ConfigError, match=r"train.schedule.min_lr=0.1 must be below train.optimizer.lr=0.05"):
        recipes.load("digits", ["train.schedule.min_lr=0.1"])
    with pytest.raises(ConfigError, match=r"data.class_names has 2 names for data.num_classes=10; give one name per class"):
        recipes.load("digits", ["data.class_names=[a, b]"])


def test_each_optimizer_takes_only_its_own_knobs_with_the_course_defaults():
    with pytest.raises(ConfigError, match=r"^train.optimizer.beta1: not a setting of the sgd optimizer \(its settings: "
                                          r"\['lr', 'momentum', 'name', 'nesterov', 'weight_decay'\]\)"):
        recipes.load("digits", ["train.optimizer.beta1=0.5"])
    with pytest.raises(ConfigError, match=r"train.optimizer.name='adamw': unknown optimizer; choose one of"):
        recipes.load("digits", ["train.optimizer.name=adamw"])
    adam = recipes.load("digits", ["train.optimizer.name=adam"]).train.optimizer
    assert (adam.lr, adam.beta1, adam.beta2, adam.eps) == (1e-3, 0.9, 0.999, 1e-8)
    rms = recipes.load("digits", ["train.optimizer.name=rmsprop", "train.optimizer.lr=0.01"]).train.optimizer
    assert rms.momentum == 0.0 and rms.lr == 0.01  # RMSprop no longer inherits SGD's momentum
    with pytest.raises(ConfigError, match="train.optimizer.nesterov: not a setting of the adam optimizer"):
        recipes.load("digits", ["train.optimizer.name=adam", "train.optimizer.nesterov=true"])


def test_unknown_recipe_and_malformed_override():
    with pytest.raises(ConfigError, match="did you mean 'digits'"):
        recipes.load("digit")
    with pytest.raises(ConfigError, match="expected key=value"):
        recipes.load("digits", ["train.epochs"])


def test_overrides_apply_and_bn_mode_defaults_to_sync_with_workers():
    cfg = recipes.load("digits", ["train.epochs=3", "train.optimizer.name=adam", "train.workers=1"])
    assert cfg.train.epochs == 3 and cfg.train.optimizer.name == "adam"
    assert cfg.train.bn_mode == "local"
    assert recipes.load("digits", ["train.workers=2"]).train.bn_mode == "sync"
    assert recipes.load("digits", ["train.workers=2", "train.bn=local"]).train.bn_mode == "local"


def test_more_workers_than_cluster_cpus():
    cfg = recipes.load("digits", ["train.workers=3"])
    with pytest.raises(ConfigError, match=r"train.workers=3 .* needs 3 CPUs but the Ray cluster has 2; lower train.workers \(at most 2\)"):
        check_resources(cfg, {"CPU": 2.0})
    check_resources(recipes.load("digits", ["train.workers=2"]), {"CPU": 2.0})


def test_shipped_recipes_validate():
    for name in recipes.available():
        recipes.load(name)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=120)


def test_cli_user_error_is_one_line_and_exit_code_2():
    r = _cli("show-config", "--recipe", "digits", "--set", "train.optimizer.momentum=1.5")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.optimizer.momentum=1.5" in lines[0]
    assert "Traceback" not in r.stderr


def test_cli_show_config_and_json_schema():
    r = _cli("show-config", "--recipe", "digits", "--set", "train.epochs=2")
    assert r.returncode == 0 and '"epochs": 2' in r.stdout
    r = _cli("show-config", "--json-schema")
    assert r.returncode == 0 and '"TrainConfig"' in r.stdout
