"""Bad input the pruning API must refuse clearly (audit gaps 5-7): emptied layers, wrong example inputs,
mismatched N:M masks, and layer/group patterns that match nothing."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.sparsity import NM, Magnitude, Structured, prune_
from netshrink.sparsity.nm import compress_nm, nm_mask

from sparsity_helpers import frozen_copy, small_mlp, state_equal


# ---- gap 5: global magnitude pruning must not empty a layer silently ----------------------------------------------
def test_global_magnitude_refuses_to_empty_a_layer_naming_it():
    model = small_mlp()
    with torch.no_grad():
        model[4].weight.mul_(1e-4)  # the last Linear's weights all fall under the global threshold
    before = frozen_copy(model)
    with pytest.raises(NetshrinkError, match=r"^4: global sparsity 0.9 would remove every weight") as info:
        prune_(model, Magnitude(0.9), inplace=True)
    assert info.value.where == "4" and "0 of 24 kept" in info.value.what
    assert "scope='layer'" in info.value.hint and "exclude" in info.value.hint
    assert state_equal(before, model)
    # the ways out named in the hint work
    assert prune_(model, Magnitude(0.9, scope="layer")) is not None
    assert prune_(model, Magnitude(0.9, exclude=("4",))) is not None


def test_per_layer_sparsity_emptying_a_layer_is_refused():
    with pytest.raises(NetshrinkError, match=r"^4: per_layer sparsity 0.99 would remove every weight") as info:
        prune_(small_mlp(), Magnitude(0.5, scope="layer", per_layer={"4": 0.99}))
    assert "Magnitude.per_layer['4']" in info.value.hint


# ---- gap 6: wrong example inputs, mismatched masks ----------------------------------------------------------------
def test_wrong_channel_count_in_example_inputs_names_the_input_and_layer(digit_cnn, capfd):
    before = frozen_copy(digit_cnn)
    with pytest.raises(NetshrinkError) as info:
        prune_(digit_cnn, Structured(0.5), example_inputs=(torch.randn(2, 3, 28, 28),), inplace=True)
    err = info.value
    assert err.where == "example_inputs"
    assert err.what.startswith("shape (2, 3, 28, 28) does not fit the model at conv_layers.0 (Conv2d): RuntimeError")
    assert "ShapeProp" not in str(err) and "\n" not in str(err)
    assert "Traceback" not in capfd.readouterr().err  # torch's ShapeProp would print one
    assert state_equal(before, digit_cnn)


def test_wrong_spatial_size_names_the_first_layer_that_disagrees(digit_cnn, capfd):
    with pytest.raises(NetshrinkError, match=r"^example_inputs: shape \(2, 1, 20, 20\) does not fit the model at "
                                             r"fc_layers\.0 \(Linear\): RuntimeError: mat1 and mat2"):
        prune_(digit_cnn, Structured(0.5), example_inputs=(torch.randn(2, 1, 20, 20),))
    assert "Traceback" not in capfd.readouterr().err


def test_a_bare_tensor_as_example_inputs_is_refused(digit_cnn):
    with pytest.raises(NetshrinkError, match=r"^example_inputs: example_inputs is a tensor, not a tuple"):
        prune_(digit_cnn, Structured(0.5), example_inputs=torch.randn(1, 1, 28, 28))


class GatedFFN(nn.Module):
    """A Llama-style MLP: FFN pruning plans without the inputs, so they are first run after the cut."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def test_wrong_inputs_after_an_ffn_cut_are_blamed_on_the_inputs_not_the_cut():
    model = GatedFFN()
    with pytest.raises(NetshrinkError, match=r"^example_inputs: shape \(2, 5\) does not fit the model at gate_proj "
                                             r"\(Linear\): RuntimeError"):
        prune_(model, Structured(0.5, targets=("ffn",)), example_inputs=(torch.randn(2, 5),))
    cut = prune_(model, Structured(0.5, targets=("ffn",)), example_inputs=(torch.randn(2, 4),))
    assert cut.up_proj.out_features == 4


def test_compress_nm_with_a_mask_of_the_wrong_shape_is_refused():
    w = torch.randn(4, 8)
    with pytest.raises(NetshrinkError, match=r"^compress_nm: mask shape \(4, 4\) does not match weight shape \(4, 8\)"):
        compress_nm(w, 2, 4, mask=nm_mask(torch.randn(4, 4)))
    with pytest.raises(NetshrinkError, match=r"^compress_nm: weight has 4 dimensions, expected 2"):
        compress_nm(torch.randn(4, 8, 3, 3))


# ---- gap 7: patterns that match nothing ---------------------------------------------------------------------------
def test_magnitude_exclude_matching_no_layer_is_refused_with_a_suggestion(digit_cnn):
    before = frozen_copy(digit_cnn)
    with pytest.raises(NetshrinkError) as info:
        prune_(digit_cnn, Magnitude(0.5, exclude=("fc_layers.0", "fc_layer.2")), inplace=True)
    assert info.value.where == "Magnitude.exclude[1]"
    assert info.value.what == "pattern 'fc_layer.2' matches no layer of this model"
    assert info.value.hint == "did you mean 'fc_layers.2'?"
    assert state_equal(before, digit_cnn)


def test_exclude_naming_a_block_suggests_its_layers(digit_cnn):
    with pytest.raises(NetshrinkError, match=r"^NM\.exclude\[0\]: .*did you mean 'conv_layers\.\*'\?"):
        prune_(digit_cnn, NM(2, 4, exclude=("conv_layers",)))


def test_patterns_that_work_keep_working(digit_cnn):
    with pytest.warns(UserWarning, match="padded"):
        prune_(digit_cnn, NM(2, 4, exclude=("fc_layers.*",)))
    m = prune_(digit_cnn, Magnitude(0.5, exclude=("fc*", "conv_layers.0")))
    assert not hasattr(m.conv_layers[0], "parametrizations")
    x = (torch.randn(2, 1, 28, 28),)
    cut = prune_(digit_cnn, Structured(0.5, exclude=("conv_layers.0",), per_group={"conv_layers.[36]": 0.25}),
                 example_inputs=x)
    assert cut.conv_layers[0].out_channels == 32 and cut.conv_layers[3].out_channels == 48


def test_magnitude_per_layer_naming_no_layer_is_refused(digit_cnn):
    with pytest.raises(NetshrinkError, match=r"^Magnitude\.per_layer\['fc_layer\.0'\]: name 'fc_layer\.0' matches no "
                                             r"prunable layer of this model \(did you mean 'fc_layers\.0'\?\)"):
        prune_(digit_cnn, Magnitude(0.5, per_layer={"fc_layer.0": 0.5}))


def test_structured_per_group_and_exclude_matching_no_group_are_refused(digit_cnn):
    x = (torch.randn(2, 1, 28, 28),)
    with pytest.raises(NetshrinkError) as info:
        prune_(digit_cnn, Structured(0.5, per_group={"fc9": 0.9}), example_inputs=x)
    assert info.value.where == "Structured.per_group['fc9']"
    assert info.value.what == "pattern 'fc9' matches no group of this model"
    with pytest.raises(NetshrinkError, match=r"^Structured\.exclude\[0\]: pattern 'conv_layer\.3' matches no group "
                                             r"of this model \(did you mean 'conv_layers\.3'\?\)"):
        prune_(digit_cnn, Structured(0.5, exclude=("conv_layer.3",)), example_inputs=x)


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.bn, self.c2, self.fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.c2(torch.relu(self.bn(self.c(x)))).mean((2, 3)))


def test_structured_exclude_of_a_layer_inside_a_group_names_the_group():
    x = (torch.randn(2, 1, 8, 8),)
    model = ConvBN().eval()
    with pytest.raises(NetshrinkError) as info:
        prune_(model, Structured(0.5, exclude=("bn",)), example_inputs=x)
    assert info.value.where == "Structured.exclude[0]" and "cut as part of group 'c'" in info.value.hint
    # a recipe excluding a block lists its norm with its conv: the conv's group is excluded, so that is accepted
    cut = prune_(model, Structured(0.5, exclude=("c", "bn")), example_inputs=x)
    assert cut.c.out_channels == 4 and cut.bn.num_features == 4
