"""Gradient clipping gives the same training at every ep_size.

A GPT written here (nanoGPT's module layout: ``transformer.h.N.mlp`` with ``c_fc`` / ``nn.GELU`` / ``c_proj`` /
``nn.Dropout``) is converted by the ``"fff_moe"`` block and trained on 2 CPU ranks (gloo) at ep_size 2 and at
ep_size 1, from the same weights on the same per-rank batches, with ``"gradient_clipping": 1.0`` and a first
step whose gradient norm is above 1 (so that clipping acts). Parameters after a few steps must agree to float32
rounding, for SGD and Adam (DeepSpeed's optimizers from the JSON config) under ZeRO 0, 1 and 2, for the tree
router, DeepSpeed's own top-1 router over the same leaves and, when Tutel is installed, the Tutel backend. In
bf16 at ZeRO 0 (DeepSpeed's own clipping there) the first step's norm must be equal and the weights equal to bf16
rounding.

All cases run in one pair of rank processes (this file run as a script); each test asserts one case.
"""

from __future__ import annotations

import re
import sys

import pytest
from helpers import assert_ok, run_rank_checks, run_rank_scripts

pytest.importorskip("deepspeed", reason='needs DeepSpeed: pip install "fff-moe-plugin[deepspeed]"')

MAX_NORM = 1.0
STEPS = 3
# Tolerances on the parameters after STEPS steps. The two runs route every token the same way and differ only in
# the order of float32 sums (all-to-all vs local experts, the reductions), about 1e-7 here. SGD passes that on
# as it is (lr 0.3 on a gradient clipped to norm 1: a clipping factor off by 0.4%, as DeepSpeed's averaged norm
# gives, moves weights by about 1e-4). Adam divides by the root of the second moment, so where a gradient is
# small the rounding difference grows (up to about 8e-6 here, on steps of lr = 1e-2) while a uniform scale of
# the gradient hardly changes the step.
TOL = {"SGD": dict(rtol=1e-5, atol=1e-6), "Adam": dict(rtol=1e-4, atol=2e-5)}

# bf16 at ZeRO 0: DeepSpeed's FP16_UnfusedOptimizer clips by the norm of the non-expert gradients alone, the
# same at every ep_size; the check is that this first norm is equal, and the weights equal to bf16 rounding
TOL["SGD-bf16"] = dict(rtol=1.6e-2, atol=4e-3)

CASES = {
    # name: (router, backend, zero stage, optimizer, precision)
    **{f"tree_zero{z}_{o.lower()}": ("tree", "deepspeed", z, o, "fp32") for z in (0, 1, 2) for o in ("SGD", "Adam")},
    "tree_zero0_sgd_bf16": ("tree", "deepspeed", 0, "SGD", "bf16"),
    "topk_zero0_sgd": ("topk", "deepspeed", 0, "SGD", "fp32"),
    "topk_zero0_adam": ("topk", "deepspeed", 0, "Adam", "fp32"),
    "topk_zero2_adam": ("topk", "deepspeed", 2, "Adam", "fp32"),
    "tutel_zero0_sgd": ("tree", "tutel", 0, "SGD", "fp32"),
    "tutel_zero2_adam": ("tree", "tutel", 2, "Adam", "fp32"),
}
VOCAB, BLOCK, WIDTH, HEADS, LAYERS = 64, 16, 32, 2, 2


# ---------------------------------------------------------------------------------------------------- worker
def _gpt():
    """A small GPT in nanoGPT's layout (the module names its users' checkpoints carry)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class CausalSelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            # no bias (nanoGPT's bias=False): the key bias has a zero gradient, which Adam would turn from
            # rounding noise into full-size steps
            self.c_attn = nn.Linear(WIDTH, 3 * WIDTH, bias=False)
            self.c_proj = nn.Linear(WIDTH, WIDTH)

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = self.c_attn(x).split(C, dim=2)
            q, k, v = (t.view(B, T, HEADS, C // HEADS).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = nn.Linear(WIDTH, 4 * WIDTH)
            self.gelu = nn.GELU()
            self.c_proj = nn.Linear(4 * WIDTH, WIDTH)
            self.dropout = nn.Dropout(0.0)

        def forward(self, x):
            return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.attn = nn.LayerNorm(WIDTH), CausalSelfAttention()
            self.ln_2, self.mlp = nn.LayerNorm(WIDTH), MLP()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(VOCAB, WIDTH), wpe=nn.Embedding(BLOCK, WIDTH), drop=nn.Dropout(0.0),
                h=nn.ModuleList(Block() for _ in range(LAYERS)), ln_f=nn.LayerNorm(WIDTH)))
            self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)

        def forward(self, idx):
            t = self.transformer
            pos = torch.arange(idx.shape[1], device=idx.device)
            x = t.drop(t.wte(idx) + t.wpe(pos))
            for block in t.h:
                x = block(x)
            return self.lm_head(t.ln_f(x))  # [B, T, VOCAB]

    torch.manual_seed(0)
    return GPT()


def _ds_config(router: str, backend: str, zero: int, optimizer: str, precision: str, ep_size: int) -> dict:
    params = {"lr": 0.3} if optimizer == "SGD" else {"lr": 1e-2, "torch_adam": True}
    return {
        "bf16": {"enabled": precision == "bf16"},
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
        "gradient_clipping": MAX_NORM,
        "optimizer": {"type": optimizer, "params": params},
        "zero_optimization": {"stage": zero}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
        "fff_moe": {"depth": 2, "leaf_width": 32, "ep_size": ep_size, "router": router, "backend": backend,
                    "capacity_factor": 1.0, "drop_tokens": False, "load_balance": "none",
                    "replace": "transformer.h.*.mlp"},
    }


def _batch(rank: int, step: int):
    import torch

    g = torch.Generator().manual_seed(1000 * rank + step)
    seq = torch.randint(0, VOCAB, (4, BLOCK + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


_EXPERT = re.compile(r"^(.*\.deepspeed_experts\.)(\d+)(\..+)$")


def _global_name(name: str, n_local: int, ep_rank: int) -> str:
    """The name of a parameter in the ep_size-1 model: a local expert index becomes the global one."""
    m = _EXPERT.match(name)
    return name if m is None else f"{m.group(1)}{ep_rank * n_local + int(m.group(2))}{m.group(3)}"


def _state(engine, ep_size: int) -> dict:
    """Every tensor of the model's state dict under its ep_size-1 name (this rank's leaves only)."""
    import torch

    rank = torch.distributed.get_rank() % ep_size
    n_local = 4 // ep_size
    return {_global_name(k, n_local, rank): v.detach().clone() for k, v in engine.module.state_dict().items()
            if torch.is_tensor(v)}


def _train(engine, rank: int, norm_from: str | None) -> tuple[list[float], float | None]:
    """STEPS steps; returns the losses and the first step's gradient norm before clipping: ``"grads"`` reads it
    from the gradients (ZeRO 0 in fp32 at ep_size 1, where every rank holds every full, averaged gradient),
    ``"engine"`` takes the norm the engine clipped with (``get_global_grad_norm``), None neither."""
    import torch
    import torch.nn.functional as F

    from fff_moe_plugin.deepspeed import aux_loss

    losses, norm = [], None
    for step in range(STEPS):
        idx, targets = _batch(rank, step)
        logits = engine(idx)
        # summed over each sequence's tokens, averaged over sequences (fairseq's scale): gradients above 1
        ce = F.cross_entropy(logits.float().reshape(-1, VOCAB), targets.reshape(-1), reduction="sum") / idx.shape[0]
        loss = ce + aux_loss(engine)
        engine.backward(loss)
        if norm_from == "grads" and step == 0:
            norm = float(torch.stack([p.grad.norm() for p in engine.module.parameters()
                                      if p.grad is not None]).square().sum().sqrt())
        engine.step()
        if norm_from == "engine" and step == 0:
            norm = float(engine.get_global_grad_norm())
        losses.append(float(loss))
    return losses, norm


def _engine(router, backend, zero, optimizer, precision, ep_size, init=None):
    from fff_moe_plugin.deepspeed import initialize

    engine, *_ = initialize(model=_gpt(), config=_ds_config(router, backend, zero, optimizer, precision, ep_size),
                            verbose=False)
    if init is not None:  # the ep_size-1 model's initial weights, this rank's leaves picked out
        import torch

        rank = torch.distributed.get_rank() % ep_size
        state = engine.module.state_dict()
        for k in state:
            if torch.is_tensor(state[k]):
                state[k] = init[_global_name(k, 4 // ep_size, rank)]
        engine.module.load_state_dict(state)
        if zero > 0:
            engine.optimizer.refresh_fp32_params()  # the optimizer's fp32 copy of the weights
    return engine


def check_case(rank: int, router: str, backend: str, zero: int, optimizer: str, precision: str) -> None:
    import torch

    one = _engine(router, backend, zero, optimizer, precision, ep_size=1)
    init = _state(one, 1)
    losses1, norm = _train(one, rank, norm_from="grads" if zero == 0 and precision == "fp32" else "engine")
    two = _engine(router, backend, zero, optimizer, precision, ep_size=2, init=init)
    assert _state(two, 2).keys() <= init.keys()
    losses2, norm2 = _train(two, rank, norm_from="engine" if precision == "bf16" else None)
    # clipping acts: the first step's norm is well above the threshold
    assert norm > 1.5 * MAX_NORM, f"the first step's gradient norm {norm:.3f} is not above {MAX_NORM}"
    if precision == "bf16":
        assert norm2 == norm, f"first step's norm: {norm2} at ep_size 2, {norm} at ep_size 1"
    torch.testing.assert_close(losses2[0], losses1[0], rtol=1e-6, atol=1e-6)
    final1, final2 = _state(one, 1), _state(two, 2)
    tol = TOL[optimizer if precision == "fp32" else f"{optimizer}-{precision}"]
    for name, p in final2.items():
        torch.testing.assert_close(p, final1[name], **tol, msg=lambda m, n=name: f"{n}: {m}")
    assert not torch.equal(final1["lm_head.weight"], init["lm_head.weight"])  # training moved the weights


def worker(out_dir: str, names: list[str]) -> None:
    try:
        import fff_moe_plugin.integrations.tutel  # noqa: F401

        tutel = None
    except ImportError as e:
        tutel = str(e)

    def case(name):
        router, backend, zero, optimizer, precision = CASES[name]
        if backend == "tutel" and tutel is not None:
            return lambda rank: "skip: " + tutel
        return lambda rank: check_case(rank, router, backend, zero, optimizer, precision)

    run_rank_checks(out_dir, {name: case(name) for name in names})


# ---------------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_rank_scripts(__file__, tmp_path_factory.mktemp("ds_clip"), list(CASES), timeout=400)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_clipped_training_at_ep_size_2_equals_ep_size_1(results, case):
    status = results[0].get(case, "")
    if isinstance(status, str) and status.startswith("skip: "):
        pytest.skip(status[len("skip: "):])
    assert_ok(results, case)


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2:])
