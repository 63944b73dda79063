"""Recipes: typed, complete, and every mistake is a ConfigError that says what and where."""

import argparse

import pytest

from genforge.config import (ConfigError, DataConfig, Recipe, TrainConfig, check_known_keys,
                             load_recipe, parse_override, recipe_to_dict, save_recipe, setting_differences)
from genforge.train import Method, register_method

TOY = "toy_config_tests"


@register_method(TOY)
class ToyConfigMethod(Method):
    def validate_model_config(self, model_cfg):
        check_known_keys(model_cfg, ["width", "depth"], "model", "toy")
        if not isinstance(model_cfg.get("width", 1), int):
            raise ConfigError(f"'model.width' must be int, got {model_cfg['width']!r}")


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_fill_every_omitted_section(tmp_path):
    recipe = load_recipe(write(tmp_path, f"method: {TOY}\n"))
    assert recipe == Recipe(method=TOY)
    assert recipe.output_dir == f"runs/{TOY}"
    assert recipe.data == DataConfig() and recipe.train == TrainConfig()
    assert recipe.train.betas == (0.9, 0.999)


def test_values_are_typed_ints_widen_to_float_and_exponents_are_floats(tmp_path):
    recipe = load_recipe(write(tmp_path, f"""
method: {TOY}
seed: 3
data: {{batch_size: 32, root: /data}}
model: {{width: 8}}
train: {{lr: 1e-4, weight_decay: 1, betas: [0.5, 0.99], max_minutes: 2, grad_clip: null}}
sample: {{guidance_scale: 2}}
"""))
    assert recipe.train.lr == 1e-4 and isinstance(recipe.train.lr, float)
    assert recipe.train.weight_decay == 1.0 and isinstance(recipe.train.weight_decay, float)
    assert recipe.train.betas == (0.5, 0.99) and recipe.train.max_minutes == 2.0
    assert recipe.sample.guidance_scale == 2.0 and recipe.data.root == "/data"
    assert recipe.model == {"width": 8} and recipe.seed == 3


def test_unknown_key_names_key_file_allowed_keys_and_a_suggestion(tmp_path):
    path = write(tmp_path, f"method: {TOY}\ntrain:\n  max_step: 10\n", name="typo.yaml")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    message = str(err.value)
    assert "train.max_step" in message and str(path) in message
    assert "max_steps, max_minutes, lr" in message
    assert "did you mean 'max_steps'?" in message


def test_unknown_top_level_section_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'trian'.*did you mean 'train'"):
        load_recipe(write(tmp_path, f"method: {TOY}\ntrian: {{}}\n"))


@pytest.mark.parametrize("line, needle", [
    ("train: {lr: fast}", r"'train.lr' must be float, got 'fast' \(str\)"),
    ("train: {max_steps: 10.5}", r"'train.max_steps' must be int, got 10.5"),
    ("train: {max_steps: true}", r"'train.max_steps' must be int, got True \(bool\)"),
    ("train: {betas: [0.9, x]}", r"'train.betas\[1\]' must be float, got 'x'"),
    ("train: {betas: [0.9]}", r"'train.betas' must have 2 elements"),
    ("train: {max_minutes: soon}", r"'train.max_minutes' must be float or null, got 'soon'"),
    ("train: {mixed_precision: fp17}", r"'train.mixed_precision' must be one of 'no', 'fp16'"),
    ("train: {grad_accum: 0}", r"'train.grad_accum' must be >= 1, got 0"),
    ("data: [1, 2]", r"'data' must be a mapping, got \[1, 2\]"),
    ("seed: '0'", r"'seed' must be int, got '0' \(str\)"),
])
def test_wrong_type_names_key_expected_type_and_value(tmp_path, line, needle):
    path = write(tmp_path, f"method: {TOY}\n{line}\n")
    with pytest.raises(ConfigError, match=needle) as err:
        load_recipe(path)
    assert str(path) in str(err.value)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match=f"recipe file not found: {tmp_path / 'nope.yaml'}"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", ""])
def test_yaml_that_is_not_a_mapping_is_rejected(tmp_path, text):
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_recipe(write(tmp_path, text))


def test_missing_method_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="missing required key 'method'"):
        load_recipe(write(tmp_path, "seed: 1\n"))


def test_unknown_method_lists_registered_methods(tmp_path):
    path = write(tmp_path, "method: nosuchmethod\n")
    with pytest.raises(ConfigError, match=f"unknown method 'nosuchmethod'.*{TOY}") as err:
        load_recipe(path)
    assert str(path) in str(err.value)


def test_the_method_validates_its_model_section_at_load_time(tmp_path):
    with pytest.raises(ConfigError, match="model.widht.*did you mean 'width'"):
        load_recipe(write(tmp_path, f"method: {TOY}\nmodel: {{widht: 3}}\n"))
    with pytest.raises(ConfigError, match="'model.width' must be int"):
        load_recipe(write(tmp_path, f"method: {TOY}\nmodel: {{width: wide}}\n"))


def test_dotted_overrides_are_validated_like_the_file(tmp_path):
    path = write(tmp_path, f"method: {TOY}\ntrain: {{max_steps: 100}}\n")
    recipe = load_recipe(path, {"train.max_steps": 10, "output_dir": "elsewhere", "model.depth": 2})
    assert recipe.train.max_steps == 10 and recipe.output_dir == "elsewhere"
    assert recipe.model == {"depth": 2}
    with pytest.raises(ConfigError, match="did you mean 'max_steps'"):
        load_recipe(path, {"train.max_stepz": 10})


def test_valid_recipe_round_trips_through_save_and_load(tmp_path):
    recipe = load_recipe(write(tmp_path, f"""
method: {TOY}
output_dir: runs/x
data: {{name: digits, image_size: 8, batch_size: 16}}
model: {{width: 4, depth: 2}}
train: {{max_steps: 5, lr: 3e-3, betas: [0.8, 0.9], mixed_precision: bf16, grad_clip: 1.0}}
eval: {{inception_weights: /weights/pt_inception.pth}}
"""))
    save_recipe(recipe, tmp_path / "run" / "recipe.yaml")
    again = load_recipe(tmp_path / "run" / "recipe.yaml")
    assert again == recipe
    assert recipe_to_dict(again)["train"]["betas"] == [0.8, 0.9]


@pytest.mark.parametrize("text, key, lines", [
    (f"method: {TOY}\nseed: 1\nseed: 2\n", "seed", (2, 3)),
    (f"method: {TOY}\ntrain:\n  max_steps: 5\n  lr: 0.1\nsample: {{steps: 3}}\ntrain:\n  lr: 0.2\n", "train", (2, 6)),
    (f"method: {TOY}\ntrain:\n  lr: 0.1\n  max_steps: 5\n  lr: 0.2\n", "lr", (3, 5)),
    (f"method: {TOY}\ntrain: {{lr: 0.1, lr: 0.2}}\n", "lr", (2, 2)),
])
def test_a_key_given_twice_names_the_key_the_file_and_both_lines(tmp_path, text, key, lines):
    path = write(tmp_path, text, name="twice.yaml")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert str(err.value) == f"{path}: duplicate key '{key}' at lines {lines[0]} and {lines[1]}"


def test_a_yaml_merge_may_still_be_overridden_by_the_mapping_it_merges_into(tmp_path):
    recipe = load_recipe(write(tmp_path, f"method: {TOY}\neval: &shared {{batch_size: 16}}\n"
                                         "data:\n  <<: *shared\n  batch_size: 32\n"))
    assert recipe.eval.batch_size == 16 and recipe.data.batch_size == 32


def test_set_overrides_read_yaml_and_e_notation_numbers():
    assert parse_override("train.lr=1e-2") == ("train.lr", 0.01)
    assert parse_override("train.lr=0.5") == ("train.lr", 0.5)
    assert parse_override("data.name=digits") == ("data.name", "digits")
    assert parse_override("model.args={depth: 2}") == ("model.args", {"depth": 2})
    with pytest.raises(argparse.ArgumentTypeError, match="expected KEY=VALUE, got 'train.lr'"):
        parse_override("train.lr")
    with pytest.raises(argparse.ArgumentTypeError, match="model.args: the value '{depth' is not valid YAML"):
        parse_override("model.args={depth")


def test_setting_differences_name_each_changed_key_with_its_recorded_and_new_value():
    recorded, now = {"seed": 0, "top_k": 3, "teachers": ["a"]}, {"seed": 1, "top_k": 3, "ns": 4}
    assert setting_differences(recorded, now) == "ns: None -> 4; seed: 0 -> 1; teachers: ['a'] -> None"
    assert setting_differences(recorded, now, ["top_k", "seed"]) == "seed: 0 -> 1"
    assert setting_differences(recorded, dict(recorded)) == ""
