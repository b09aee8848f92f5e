"""Recipes are validated at the door: every mistake names the key and what is allowed."""

import re
import tomllib

import pytest
from conftest import RECIPES, ROOT, write_recipe

from fastft.errors import FastftError
from fastft.recipe import load_recipe, recipe_from_dict, reference_markdown, to_toml

MINIMAL = '[data]\npath = "d.jsonl"\n'


def recipe_text(tmp_path, text):
    return load_recipe(write_recipe(tmp_path / "r.toml", text))


def test_defaults_and_relative_paths(tmp_path):
    r = recipe_text(tmp_path, MINIMAL)
    assert r.model.name == "fastft:tiny" and r.lora.target_modules == ["all-linear"]
    assert r.data.path == [str((tmp_path / "d.jsonl").resolve())]  # relative to the recipe file
    assert r.name == "r"


def test_unknown_key_suggests_nearest(tmp_path):
    with pytest.raises(FastftError, match=r"r\.toml: unknown key `train\.learnig_rate` \(did you mean `learning_rate`\?\)"):
        recipe_text(tmp_path, MINIMAL + "[train]\nlearnig_rate = 1e-4\n")


def test_unknown_section_suggests_nearest(tmp_path):
    with pytest.raises(FastftError, match=r"unknown section \[trian\] \(did you mean `train`\?\)"):
        recipe_text(tmp_path, MINIMAL + "[trian]\nepochs = 1\n")


def test_wrong_type_names_key_value_and_allowed(tmp_path):
    with pytest.raises(FastftError, match=r"`train\.batch_size` = \"eight\" is not allowed: expected an integer or \"auto\""):
        recipe_text(tmp_path, MINIMAL + '[train]\nbatch_size = "eight"\n')
    with pytest.raises(FastftError, match=r"`model\.quantization` = \"8bit\" is not allowed: choose one of \"4bit\", \"16bit\", \"auto\""):
        recipe_text(tmp_path, MINIMAL + '[model]\nquantization = "8bit"\n')
    with pytest.raises(FastftError, match=r"`lora\.dropout` = true is not allowed: expected a number"):
        recipe_text(tmp_path, MINIMAL + "[lora]\ndropout = true\n")


def test_out_of_range(tmp_path):
    with pytest.raises(FastftError, match=r"`lora\.dropout` = 1\.5 is out of range: it must be between 0\.0 and 0\.9"):
        recipe_text(tmp_path, MINIMAL + "[lora]\ndropout = 1.5\n")
    with pytest.raises(FastftError, match=r"`train\.batch_size` = 0 is out of range: it must be at least 1"):
        recipe_text(tmp_path, MINIMAL + "[train]\nbatch_size = 0\n")


def test_malformed_toml_gives_line_and_column(tmp_path):
    with pytest.raises(FastftError, match=r"r\.toml: malformed TOML: .*line 2, column \d+"):
        recipe_text(tmp_path, "[model]\nname = \n")


def test_cross_field_rules(tmp_path):
    with pytest.raises(FastftError, match="`data.path` is missing"):
        recipe_text(tmp_path, "[train]\nepochs = 1\n")
    with pytest.raises(FastftError, match="embedding_learning_rate` is set but no embedding is trained"):
        recipe_text(tmp_path, MINIMAL + "[train]\nembedding_learning_rate = 1e-5\n")
    with pytest.raises(FastftError, match="`data.response_field` = \"reply\" is not a placeholder"):
        recipe_text(tmp_path, MINIMAL + '[data]\nresponse_field = "reply"\n'.replace("[data]\n", ""))


def test_set_overrides_are_typed_like_toml(tmp_path):
    path = write_recipe(tmp_path / "r.toml", MINIMAL)
    r = load_recipe(path, ["train.max_steps=20", "train.learning_rate=1e-3", "model.name=random:llama-3.2-1b",
                           'lora.target_modules=["q_proj", "v_proj"]', "data.packing=true"])
    assert r.train.max_steps == 20 and r.train.learning_rate == 1e-3
    assert r.model.name == "random:llama-3.2-1b" and r.lora.target_modules == ["q_proj", "v_proj"]
    assert r.data.packing is True
    with pytest.raises(FastftError, match="expected `section.key=value`"):
        load_recipe(path, ["max_steps=20"])
    with pytest.raises(FastftError, match="unknown key `train.max_step`"):
        load_recipe(path, ["train.max_step=20"])


def test_resolved_recipe_round_trips(tmp_path):
    r = load_recipe(RECIPES / "fusion_fr.toml")
    again = recipe_from_dict(tomllib.loads(to_toml(r)), source="resolved")
    assert again.to_dict() == r.to_dict()


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates_with_its_data(path, tokenizer):
    from fastft.data import prepare

    recipe = load_recipe(path, ["model.name=fastft:tiny"])
    data = prepare(recipe, tokenizer, echo=lambda *_: None)
    assert len(data.train) > 0 and data.stats["loss_tokens"] > 0


def test_readme_reference_table_is_current():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert reference_markdown() in readme, "run `python -m fastft.recipe` and paste the table under '### Reference'"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"^    (python3 -m venv .*)$", readme, flags=re.M)
    assert len(commands) >= 2 and "fastft run recipes/quickstart.toml" in commands[0]
    assert commands[1] in (ROOT / ".ci" / "run").read_text(), "the CI must run exactly the README's test command"
