"""Writes the checkpoint fixtures that tests/test_old_checkpoints.py loads: files saved by fff_moe_plugin at main
d1bb29b, when FFF kept its node weights and master leaf as flat parameters (``node_weight``, ``master_w1``, ...)
and the DeepSpeed gate its ``node_weight`` / ``node_bias``. Every later version must load them and compute the
same function with them.

The files in this folder were written by this script run on main d1bb29b, from a detached worktree of that commit
and a working directory outside the repository::

    git worktree add --detach /tmp/old-main d1bb29b
    cd /tmp && DS_ACCELERATOR=cpu PYTHONPATH=/tmp/old-main /work/main/.venv/bin/python \\
        /work/main/tests/data/checkpoints/write.py [core] [deepspeed_layer] [deepspeed_engine] [fairseq]

(no part named: all four). The script refuses a package that is not an unmodified checkout of d1bb29b: written by
any other version, the files would prove nothing. It writes next to itself:

- ``core.pt``: per core block (FFF in several configurations, the path-neuron tree, sigma-MoE, PKM, dense), its kind,
  config, ``state_dict()``, an input and the eval and training outputs (dropout and region leak 0, so
  deterministic); one FFF state dict lacks ``_extra_state``, as state dicts written before the config travelled do.
- ``deepspeed_layer.pt``: the same for the DeepSpeed ``FFFMoE`` layer, with and without master leaf.
- ``deepspeed_engine/``: ``engine.save_checkpoint(..., tag="old")`` of ``model.ToyNet`` trained 2 steps through
  ``fff_moe_plugin.deepspeed.initialize`` in one process, and ``expected.pt`` (DeepSpeed config, model arguments,
  batch, eval output, and the eval output after one more training step).
- ``fairseq/``: ``checkpoint_last.pt`` of ``fairseq-train --arch transformer_lm_fff`` (2 updates on the toy corpus
  of tests/helpers.py), the data-bin's ``dict.txt``, and ``expected.pt`` (tokens and the model's eval logits).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TESTS = HERE.parents[1]
COMMIT = "d1bb29b"
PARTS = ("core", "deepspeed_layer", "deepspeed_engine", "fairseq")
MARGIN = 1e-3  # routing decisions on the fixture inputs stay this far from their boundary

# -- the DeepSpeed engine checkpoint ------------------------------------------------------------------------------
ENGINE_MODEL = {"d_model": 8, "hidden": 16, "n_blocks": 2}
ENGINE_CONFIG = {
    "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
    "optimizer": {"type": "Adam", "params": {"lr": 0.01, "torch_adam": True}},
    "zero_optimization": {"stage": 0}, "steps_per_print": 10**9,
    "fff_moe": {"depth": 2, "leaf_width": 4, "replace": "blocks.*.mlp", "master_leaf": True, "hardening": 0.01,
                "load_balance_coef": 0.01, "capacity_factor": 8.0, "eval_capacity_factor": 8.0},
}

# -- the fairseq checkpoint (the flags of tests/test_fairseq_train.py) -------------------------------------------
FAIRSEQ_TRAIN = ["--task", "language_modeling", "--criterion", "cross_entropy_fff", "--optimizer", "adam", "--lr",
                 "0.01", "--tokens-per-sample", "16", "--sample-break-mode", "none", "--max-tokens", "256", "--seed",
                 "3", "--log-format", "json", "--log-interval", "1", "--num-workers", "0", "--disable-validation",
                 "--no-epoch-checkpoints"]
FAIRSEQ_TINY = ["--decoder-embed-dim", "16", "--decoder-layers", "2", "--decoder-attention-heads", "2",
                "--decoder-ffn-embed-dim", "32", "--decoder-normalize-before"]
FAIRSEQ_ARCH = ["--arch", "transformer_lm_fff", "--fff-depth", "2", "--fff-leaf-width", "8", "--fff-hardening", "0.1",
                "--fff-load-balance", "leaf", "--fff-master-leaf"]
FAIRSEQ_RUN = ["--max-update", "2", "--no-save-optimizer-state", "--cpu"]


def check_source() -> dict:
    """The package's commit; exits unless it is an unmodified checkout of :data:`COMMIT`."""
    import fff_moe_plugin

    root = Path(fff_moe_plugin.__file__).resolve().parents[1]

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)

    head = git("rev-parse", "HEAD").stdout.strip()
    if not head.startswith(COMMIT):
        sys.exit(f"fff_moe_plugin is imported from {root} at commit {head or '(not a git checkout)'}; these "
                 f"fixtures are written by {COMMIT} (see this script's docstring)")
    if git("diff", "--quiet", "HEAD", "--", "fff_moe_plugin").returncode != 0:
        sys.exit(f"fff_moe_plugin in {root} differs from {COMMIT}; write the fixtures from an unmodified checkout")
    print(f"fff_moe_plugin from {root} at {head}", flush=True)
    return {"commit": head, "torch": str(torch.__version__)}


def inputs(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def require_margin(name: str, gap: torch.Tensor) -> None:
    """Exit when a routing decision of the fixture input lies within :data:`MARGIN` of its boundary."""
    if float(gap) < MARGIN:
        sys.exit(f"{name}: a routing decision is {float(gap):.2e} from its boundary; pick another input seed")


def top_gap(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Smallest distance, over rows, between the k-th and the (k+1)-th largest score ([S, n] -> scalar)."""
    top = scores.sort(dim=-1, descending=True).values
    return (top[:, k - 1] - top[:, k]).min()


def decision_gap(layer, x: torch.Tensor) -> torch.Tensor:
    """How far the layer's routing decisions on ``x`` are from flipping."""
    import torch.nn.functional as F

    from fff_moe_plugin import FFF, PKM, DenseFFN, SigmaMoE, UltraFastFFF
    from fff_moe_plugin.tree import decision_linear

    x = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        if isinstance(layer, FFF):
            return decision_linear(x, layer.node_weight, layer.node_bias).abs().min()
        if isinstance(layer, UltraFastFFF):
            return F.linear(x, layer.neuron_in, layer.neuron_bias).abs().min()
        if isinstance(layer, SigmaMoE):
            return top_gap(x @ layer.selection.T, layer.config.top_k)
        if isinstance(layer, PKM):
            c = layer.config
            assert c.knn <= c.n_keys, "the check reads every sub-key pair, as PKM does when knn >= n_keys"
            q = x.view(x.shape[0], 2, c.d_model // 2)
            s = torch.einsum("sxd,hxnd->shxn", q, layer.keys)  # [S, H, 2, n]
            pairs = (s[:, :, 0, :, None] + s[:, :, 1, None, :]).flatten(2)  # [S, H, n*n]
            return top_gap(pairs.flatten(0, 1), c.knn)
        if isinstance(layer, DenseFFN):
            return torch.tensor(float("inf"))
    raise TypeError(type(layer).__name__)


def core_cases():
    """(name, config, input seed, adjust(layer), keep _extra_state) per core fixture."""
    from fff_moe_plugin import DenseConfig, FFFConfig, PKMConfig, SigmaMoEConfig, UltraFastConfig

    def gate(value: float):
        return lambda layer: layer.master_gate.fill_(value)

    def output_bias(layer):
        layer.output_bias.copy_(torch.linspace(-0.5, 0.5, layer.output_bias.numel()))

    return [
        ("fff_hard_master_leaf_balance",
         FFFConfig(d_model=8, leaf_width=4, depth=2, train_mode="hard", master_leaf=True, load_balance="leaf",
                   hardening=0.1), 1, gate(0.7), True),
        ("fff_soft_node_balance",
         FFFConfig(d_model=8, leaf_width=4, depth=2, load_balance="node", hardening=0.1), 2, None, True),
        ("fff_soft_no_bias_master",
         FFFConfig(d_model=8, leaf_width=4, depth=2, d_out=6, activation="gelu", bias=False, master_leaf=True,
                   master_leaf_width=6, hardening=0.1), 3, gate(-0.4), True),
        ("fff_hard_no_bias",
         FFFConfig(d_model=8, leaf_width=4, depth=3, train_mode="hard", bias=False, load_balance="leaf"), 4, None,
         True),
        ("fff_hard_master_without_config",
         FFFConfig(d_model=8, leaf_width=4, depth=2, train_mode="hard", master_leaf=True), 5, gate(0.3), False),
        ("path_neuron", UltraFastConfig(d_model=8, depth=2, output_bias=True), 6, output_bias, True),
        ("sigma_moe", SigmaMoEConfig(d_model=8, n_experts=4, expert_size=4, top_k=2), 7, None, True),
        ("pkm", PKMConfig(d_model=8, n_keys=4, n_heads=2, knn=4), 8, None, True),
        ("dense", DenseConfig(d_model=8, d_ff=16), 9, None, True),
    ]


def write_core(meta: dict) -> None:
    from fff_moe_plugin import build_block

    layers = {}
    for seed, (name, config, x_seed, adjust, with_config) in enumerate(core_cases(), start=10):
        torch.manual_seed(seed)
        layer = build_block(config)
        if adjust is not None:
            with torch.no_grad():
                adjust(layer)
        x = inputs(x_seed, 3, 5, config.d_model)
        require_margin(name, decision_gap(layer, x))
        state = layer.state_dict()
        if not with_config:
            del state["_extra_state"]
        train = layer.train()(x)
        layers[name] = {
            "kind": config.kind, "config": config.to_dict(), "state_dict": state, "x": x,
            "eval_output": layer.eval()(x).output.detach(),
            "train_output": train.output.detach(), "train_aux_loss": train.aux_loss.detach(),
        }
    torch.save({"meta": meta, "layers": layers}, HERE / "core.pt")


def write_deepspeed_layer(meta: dict) -> None:
    from fff_moe_plugin import FFFConfig
    from fff_moe_plugin.integrations.deepspeed import FFFMoE
    from fff_moe_plugin.tree import decision_linear

    kwargs = {"capacity_factor": 8.0, "eval_capacity_factor": 8.0}
    cases = [
        ("master_leaf", FFFConfig(d_model=8, leaf_width=4, depth=2, train_mode="hard", master_leaf=True,
                                  load_balance="leaf", hardening=0.1), 0.7),
        ("no_master_no_bias", FFFConfig(d_model=8, leaf_width=4, depth=2, train_mode="hard", bias=False,
                                        load_balance="node", hardening=0.1), None),
    ]
    layers = {}
    for seed, (name, config, gate) in enumerate(cases, start=30):
        torch.manual_seed(seed)
        layer = FFFMoE(config, **kwargs)
        if gate is not None:
            with torch.no_grad():
                layer.master_gate.fill_(gate)
        x = inputs(seed + 10, 3, 5, config.d_model)
        with torch.no_grad():
            gap = decision_linear(x.reshape(-1, 8), layer.gate.node_weight, layer.gate.node_bias).abs().min()
        require_margin(name, gap)
        train_output, l_aux, _ = layer.train()(x)
        layers[name] = {
            "config": config.to_dict(), "kwargs": kwargs, "state_dict": layer.state_dict(), "x": x,
            "eval_output": layer.eval()(x)[0].detach(),
            "train_output": train_output.detach(), "train_l_aux": l_aux.detach(),
        }
    torch.save({"meta": meta, "layers": layers}, HERE / "deepspeed_layer.pt")


def load_toy_model():
    """This folder's model.py (by path: the folder is no package)."""
    spec = importlib.util.spec_from_file_location("old_checkpoints_model", HERE / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_deepspeed_engine(meta: dict) -> None:
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_SIZE": "1"}.items():
        os.environ[key] = value
    import torch.distributed as dist

    from fff_moe_plugin.deepspeed import initialize

    toy = load_toy_model()

    out = HERE / "deepspeed_engine"
    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(0)
    engine, *_ = initialize(model=toy.ToyNet(**ENGINE_MODEL), config=ENGINE_CONFIG, dist_backend="gloo",
                            verbose=False)
    d = ENGINE_MODEL["d_model"]
    batch = (inputs(50, 4, 6, d), inputs(51, 4, 6, d))
    x = inputs(52, 3, 5, d)
    for _ in range(2):
        toy.train_step(engine, batch)
    engine.save_checkpoint(str(out), tag="old")
    (out / "zero_to_fp32.py").unlink(missing_ok=True)  # DeepSpeed's conversion script; loading does not need it
    before = toy.eval_output(engine, x)
    toy.train_step(engine, batch)
    after = toy.eval_output(engine, x)
    torch.save({"meta": meta, "tag": "old", "ds_config": ENGINE_CONFIG, "model": ENGINE_MODEL, "model_seed": 0,
                "batch": batch, "x": x, "eval_output": before, "eval_output_after_step": after}, out / "expected.pt")
    dist.destroy_process_group()


def write_fairseq(meta: dict) -> None:
    from fairseq import checkpoint_utils, utils

    from fff_moe_plugin.experiments.lm.data_bin import fairseq_command, make_data_bin
    from fff_moe_plugin.integrations.fairseq import user_dir

    sys.path.insert(0, str(TESTS))
    from helpers import lm_text

    out = HERE / "fairseq"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data_bin({"train": lm_text(1500, 0), "valid": lm_text(100, 1), "test": lm_text(100, 2)}, tmp)
        save = Path(tmp, "save")
        args = [*FAIRSEQ_TRAIN, *FAIRSEQ_TINY, *FAIRSEQ_ARCH, *FAIRSEQ_RUN]
        cmd = fairseq_command("train") + [str(data), "--user-dir", user_dir(), "--save-dir", str(save), *args]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0:
            sys.exit(f"fairseq-train failed:\n{done.stdout[-4000:]}")
        shutil.copy(save / "checkpoint_last.pt", out / "checkpoint_last.pt")
        shutil.copy(data / "dict.txt", out / "dict.txt")

    utils.import_user_module(argparse.Namespace(user_dir=user_dir()))
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(out / "checkpoint_last.pt")],
                                                                    arg_overrides={"data": str(out)})
    model = models[0].eval()
    d = task.target_dictionary
    tokens = torch.randint(d.nspecial, len(d), (2, 12), generator=torch.Generator().manual_seed(60))
    with torch.no_grad():
        logits, _ = model(tokens)
    torch.save({"meta": meta, "train_args": args, "tokens": tokens, "logits": logits}, out / "expected.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", nargs="*", metavar="PART", help=f"any of {', '.join(PARTS)} (default: all)")
    parts = parser.parse_args().parts or PARTS
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    meta = check_source()
    writers = {"core": write_core, "deepspeed_layer": write_deepspeed_layer, "deepspeed_engine": write_deepspeed_engine,
               "fairseq": write_fairseq}
    for part in PARTS:
        if part in parts:
            writers[part](meta)
            print(f"wrote {part}", flush=True)


if __name__ == "__main__":
    main()
