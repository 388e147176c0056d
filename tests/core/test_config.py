"""Configs: every bad value raises a ValueError naming the field, unknown keys are refused, counts are exact."""

import pytest

from fff_moe_plugin import (
    DenseConfig,
    FFFConfig,
    PKMConfig,
    SigmaMoEConfig,
    UltraFastConfig,
    build_block,
)

BAD = [
    (FFFConfig, dict(d_model=8, leaf_width=4, depth=-1), "depth"),
    (FFFConfig, dict(d_model=8, leaf_width=4, depth=31), "depth"),
    (FFFConfig, dict(d_model=4096, leaf_width=4096, depth=20), "more than can be allocated"),
    (FFFConfig, dict(d_model=0, leaf_width=4, depth=2), "d_model"),
    (FFFConfig, dict(d_model=8, leaf_width=0, depth=2), "leaf_width"),
    (FFFConfig, dict(d_model=8, leaf_width=4, depth=2, d_out=-3), "d_out"),
    (FFFConfig, dict(d_model=8, leaf_width=4.0, depth=2), "leaf_width"),
    (FFFConfig, dict(d_model=8, leaf_width=True, depth=2), "leaf_width"),
    (FFFConfig, dict(d_model=8, leaf_width=4, depth=2, activation="swish2"), "activation"),
    (FFFConfig, dict(d_model=8, leaf_width=4, depth=2, train_mode="medium"), "train_mode"),
    (FFFConfig, dict(d_model=8, leaf_width=4, depth=2, region_leak=1.5), "region_leak"),
    (FFFConfig, dict(d_model=8, leaf_width=4, depth=2, region_leak=-0.1), "region_leak"),
    (FFFConfig, dict(d_model=8, leaf_width=4, depth=2, leaf_dropout=1.0), "leaf_dropout"),
    (FFFConfig, dict(d_model=8, leaf_width=4, depth=2, hardening=-1.0), "hardening"),
    (FFFConfig, dict(d_model=8, leaf_width=4, depth=2, hardening=float("nan")), "hardening"),
    (FFFConfig, dict(d_model=8, leaf_width=4, depth=2, load_balance="expert"), "load_balance"),
    (FFFConfig, dict(d_model=8, leaf_width=4, depth=2, load_balance_coef=-1), "load_balance_coef"),
    (FFFConfig, dict(d_model=8, leaf_width=4, depth=2, master_leaf="yes"), "master_leaf"),
    (FFFConfig, dict(d_model=8, leaf_width=4, depth=2, master_leaf=True, master_leaf_width=0), "master_leaf_width"),
    (UltraFastConfig, dict(d_model=8, depth=-2), "depth"),
    (UltraFastConfig, dict(d_model=8, depth=3, train_mode="soft"), "train_mode"),
    (UltraFastConfig, dict(d_model=8, depth=3, activation="elu"), "activation"),
    (SigmaMoEConfig, dict(d_model=8, n_experts=4, expert_size=2, top_k=5), "top_k"),
    (SigmaMoEConfig, dict(d_model=8, n_experts=0, expert_size=2, top_k=1), "n_experts"),
    (SigmaMoEConfig, dict(d_model=8, n_experts=4, expert_size=2, expert_dropout=1.2), "expert_dropout"),
    (SigmaMoEConfig, dict(d_model=8, n_experts=4, expert_size=2, entropy_coef=-1e-3), "entropy_coef"),
    (SigmaMoEConfig, dict(d_model=8, n_experts=4, expert_size=2, weight_scale=0), "weight_scale"),
    (PKMConfig, dict(d_model=7, n_keys=4), "d_model"),
    (PKMConfig, dict(d_model=8, n_keys=4, knn=17), "knn"),
    (PKMConfig, dict(d_model=8, n_keys=4, knn=4, n_heads=0), "n_heads"),
    (PKMConfig, dict(d_model=8, n_keys=4, knn=4, score_activation="tanh"), "score_activation"),
    (DenseConfig, dict(d_model=8, d_ff=0), "d_ff"),
    (DenseConfig, dict(d_model=8, d_ff=4, dropout=1.0), "dropout"),
]


@pytest.mark.parametrize("cls,values,field", BAD, ids=[f"{c.__name__}-{f}" for c, _, f in BAD])
def test_bad_value_raises_naming_the_field(cls, values, field):
    with pytest.raises(ValueError, match=field):
        cls.from_dict(values)


def test_error_message_names_value_and_allowed_range():
    with pytest.raises(ValueError) as e:
        FFFConfig(d_model=8, leaf_width=4, depth=2, region_leak=1.5)
    assert "region_leak = 1.5" in str(e.value) and "[0.0, 1.0]" in str(e.value)


def test_from_dict_rejects_unknown_keys_and_lists_known_ones():
    with pytest.raises(ValueError, match="unknown key.*leaf_widht.*known keys:.*leaf_width"):
        FFFConfig.from_dict(dict(d_model=8, leaf_widht=4, depth=2))


def test_to_dict_round_trip_resolves_defaults():
    c = FFFConfig(d_model=8, leaf_width=4, depth=2, master_leaf=True)
    d = c.to_dict()
    assert d["d_out"] == 8 and d["master_leaf_width"] == 4
    assert FFFConfig.from_dict(d) == c


CONFIGS = [
    FFFConfig(d_model=12, leaf_width=3, depth=0),
    FFFConfig(d_model=12, leaf_width=3, depth=3, d_out=5),
    FFFConfig(d_model=12, leaf_width=3, depth=2, master_leaf=True, master_leaf_width=7),
    FFFConfig(d_model=12, leaf_width=3, depth=2, bias=False, master_leaf=True),
    UltraFastConfig(d_model=12, depth=4),
    UltraFastConfig(d_model=12, depth=0, d_out=3, bias=False, output_bias=True),
    SigmaMoEConfig(d_model=12, n_experts=6, expert_size=4, top_k=2, d_out=9),
    PKMConfig(d_model=12, n_keys=5, n_heads=3, knn=7),
    DenseConfig(d_model=12, d_ff=30),
    DenseConfig(d_model=12, d_ff=30, bias=False, d_out=4),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_parameter_count_equals_built_module(config):
    block = build_block(config)
    assert config.num_parameters() == sum(p.numel() for p in block.parameters())


def test_parameters_per_token_of_fff():
    c = FFFConfig(d_model=10, leaf_width=4, depth=3, d_out=6)
    # 3 nodes of 10 weights + 1 bias, one leaf: 10*4 + 4 + 4*6 + 6
    assert c.num_parameters_per_token() == 3 * 11 + 40 + 4 + 24 + 6
    assert c.training_width == 32


def test_block_refuses_another_blocks_config():
    from fff_moe_plugin import FFF, PKM

    with pytest.raises(TypeError, match="FFF takes a FFFConfig, got DenseConfig"):
        FFF(DenseConfig(d_model=4, d_ff=4))
    with pytest.raises(TypeError, match="PKM takes a PKMConfig"):
        PKM(FFFConfig(d_model=4, leaf_width=2, depth=1))
