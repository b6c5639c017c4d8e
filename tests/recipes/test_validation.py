"""Bad recipes get one clear error naming the file, the line and the key path, before any work starts."""
from __future__ import annotations

import textwrap

import pytest
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.recipes.loader import builtin_names, load_recipe
from netshrink.recipes.runner import compress


def write(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def error_of(path) -> NetshrinkError:
    with pytest.raises(NetshrinkError) as info:
        load_recipe(path)
    return info.value


@pytest.mark.parametrize(
    "text, where, what, hint",
    [
        ("""
         name: t
         stages:
           - prune:
               method: magnitude
               sparsty: 0.5
         """, ":5 stages[0].prune.sparsty", "unknown key 'sparsty'", "did you mean 'sparsity'?"),
        ("""
         name: t
         stages:
           - quantize:
               method: int8-statc
         """, ":4 stages[0].quantize.method", "unknown quantize method 'int8-statc'", "did you mean 'int8-static'?"),
        ("""
         name: t
         stages:
           - prune:
               method: magnitude
               sparsity: 1.5
         """, ":5 stages[0].prune.sparsity", "less than 1 (got 1.5)", None),
        ("""
         name: t
         stages:
           - quantize: {method: int8-dynamic}
           - prune:
               method: magnitude
               sparsity: "0.5"
         """, ":6 stages[1].prune.sparsity", "valid number (got '0.5')", None),
        ("""
         name: t
         stages:
           - prnue: {method: nm}
         """, ":3 stages[0].prnue", "unknown stage 'prnue'", "did you mean 'prune'?"),
        ("""
         name: t
         stagse: []
         """, ":2 stagse", "unknown key 'stagse'", "did you mean 'stages'?"),
        ("""
         name: t
         stages:
           - quantize:
               method: gptq
               bits: 5
         """, ":5 stages[0].quantize.bits", "Input should be 2, 3, 4 or 8 (got 5)", None),
        ("""
         name: t
         stages:
           - prune:
               method: magnitude
               overrides:
                 "fc*": {sparsity: 0.2, bits: 4}
         """, ":6 stages[0].prune.overrides.fc*.bits", "'bits' cannot be set per layer", "expected one of: sparsity, skip"),
        ("""
         name: t
         stages:
           - prune: {method: nm, n: 4, m: 4}
         """, ":3 stages[0].prune", "n=4 must be smaller than m=4", None),
        ("""
         name: t
         suits: [cnn]
         stages:
           - quantize: {method: gptq}
         """, ":4 stages[0].quantize.method", "works on decoder models", None),
        ("""
         name: t
         stages:
           - export: {format: onnx}
           - quantize: {method: bf16}
         """, ":3 stages[0]", "export must be the last stage", None),
    ],
)
def test_bad_recipe_names_line_and_key(tmp_path, text, where, what, hint):
    err = error_of(write(tmp_path, text))
    assert err.where == f"{tmp_path / 'recipe.yaml'}{where}"
    assert what in err.what
    if hint is not None:
        assert err.hint == hint
    assert "\n" not in err.one_line()


def test_duplicate_key_and_bad_yaml_point_at_lines(tmp_path):
    err = error_of(write(tmp_path, "name: t\nname: u\nstages: []\n"))
    assert err.where.endswith(":2") and "appears twice" in err.what
    err = error_of(write(tmp_path, "name: t\nstages:\n  - prune: {method: nm\n"))
    assert "not valid YAML" in err.what and err.where.rsplit(":", 1)[1].isdigit()


def test_json_recipes_are_checked_the_same_way(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{\n  "name": "t",\n  "stages": [\n    {"prune": {"method": "magnitude", "sparsity": 2}}\n  ]\n}\n')
    err = error_of(path)
    assert err.where == f"{path}:4 stages[0].prune.sparsity"


def test_unknown_recipe_name_suggests_builtin():
    with pytest.raises(NetshrinkError, match="did you mean 'cnn-structured50-int8'"):
        load_recipe("cnn-structured-int8")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(1, 4, 3)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def test_override_matching_no_layer_fails_before_work(tmp_path):
    path = write(tmp_path, """
        name: t
        stages:
          - prune:
              method: magnitude
              sparsity: 0.5
              overrides:
                "hed": {sparsity: 0.1}
          - prune:
              method: magnitude
              exclude: [feature]
        """)
    model = Tiny()
    before = model.head.weight.detach().clone()
    with pytest.raises(NetshrinkError) as info:
        compress(model, path)
    assert info.value.where == f"{path}:7 stages[0].prune.overrides.hed"
    assert info.value.hint == "did you mean 'head'?"
    assert (model.head.weight == before).all()
    recipe = path.read_text().replace('"hed"', '"head"')
    path.write_text(recipe)
    with pytest.raises(NetshrinkError) as info:
        compress(model, path)
    assert info.value.where == f"{path}:10 stages[1].prune.exclude" and "'feature'" in info.value.what


def test_all_builtin_recipes_validate():
    names = builtin_names()
    assert {"int8-ptq", "int8-qat", "cnn-structured50-int8", "llm-edge-gptq4", "llm-edge-awq4",
            "gpu-2of4-fp16"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.stages and recipe.description
