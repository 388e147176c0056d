"""The soft-to-hard schedule (FFFConfig.soft_updates): the first S optimizer updates train soft, the rest hard;
the switch follows the update count, which travels with the weights, and the losses work on both sides."""

from __future__ import annotations

import pytest
import torch

from fff_moe_plugin import FFF, FFFConfig, after_optimizer_step


def _layer(seed: int = 0, **kw) -> FFF:
    values = dict(d_model=6, leaf_width=4, depth=3, train_mode="hard", soft_updates=2, hardening=0.1,
                  load_balance="leaf", master_leaf=True)
    values.update(kw)
    torch.manual_seed(seed)
    return FFF(FFFConfig(**values)).double()


def test_soft_updates_need_a_hard_tree():
    with pytest.raises(ValueError, match="soft_updates = 3 is not allowed: sets when soft training switches"):
        FFFConfig(d_model=4, leaf_width=2, depth=1, soft_updates=3)
    with pytest.raises(ValueError, match="soft_updates"):
        FFFConfig(d_model=4, leaf_width=2, depth=1, train_mode="hard", soft_updates=-1)


def test_training_is_soft_for_the_named_updates_then_hard():
    layer = _layer().train()
    soft = FFF(FFFConfig(**{**layer.config.to_dict(), "train_mode": "soft", "soft_updates": 0})).double().train()
    hard = FFF(FFFConfig(**{**layer.config.to_dict(), "soft_updates": 0})).double().train()
    with torch.no_grad():  # the same weights
        for other in (soft, hard):
            for name, p in other.named_parameters():
                p.copy_(layer.get_parameter(name))
    x = torch.randn(20, 6, dtype=torch.float64)
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)  # steps that change nothing: the schedule alone is tested
    phases = []
    for update in range(4):
        out = layer(x)
        reference = soft(x) if update < 2 else hard(x)
        torch.testing.assert_close(out.output, reference.output)
        torch.testing.assert_close(out.aux_loss, reference.aux_loss)  # hardening and balancing on both sides
        phases.append(layer.router.trains_soft())
        (out.output.sum() + out.aux_loss).backward()
        opt.step()
        after_optimizer_step(layer, update + 1)
    assert phases == [True, True, False, False]
    # eval is the hard-trained tree's function throughout: the chosen leaf scaled by its path probability
    layer.router.set_num_updates(0)
    torch.testing.assert_close(layer.eval()(x).output, hard.eval()(x).output)


def test_the_update_count_travels_with_the_weights():
    layer = _layer()
    layer.router.set_num_updates(1)
    state = layer.state_dict()
    assert int(state["router.num_updates"]) == 1
    resumed = _layer(seed=3)
    assert resumed.router.trains_soft()
    resumed.load_state_dict(state)
    resumed.router.set_num_updates(2)
    assert not resumed.train().router.trains_soft()
    again = _layer(seed=4)
    again.load_state_dict(resumed.state_dict())
    assert not again.train().router.trains_soft()  # the phase comes back with the count, before any update
