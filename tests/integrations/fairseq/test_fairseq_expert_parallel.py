"""Expert parallelism inside fairseq-train: the FFF's leaves sharded over 2 CPU ranks (gloo, legacy_ddp) through
DeepSpeed's MoE dispatch (``--fff-backend deepspeed``) or Tutel's (``--fff-backend tutel``), against the
data-parallel run that keeps the whole tree on every rank (``--fff-backend core``), on the same seed."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("fairseq", reason="needs fairseq: pip install 'fff-moe-plugin[fairseq]'")
pytest.importorskip("deepspeed", reason="needs DeepSpeed: pip install 'fff-moe-plugin[deepspeed]'")

from helpers import FAIRSEQ_TINY, FAIRSEQ_TRAIN, assert_same_state  # noqa: E402

from fff_moe_plugin.experiments.lm.data_bin import fairseq_command  # noqa: E402
from fff_moe_plugin.experiments.lm.launch import rank_commands  # noqa: E402
from fff_moe_plugin.integrations.fairseq import user_dir  # noqa: E402

pytestmark = pytest.mark.slow

TUTEL_MISSING = ("needs Tutel, which is not on PyPI: NO_CUDA=1 pip install --no-build-isolation "
                 "git+https://github.com/microsoft/tutel@main")
TINY = FAIRSEQ_TINY
TRAIN = [*FAIRSEQ_TRAIN, "--seed", "5", "--save-interval-updates", "2"]  # the later --seed wins
# hard training (the function every backend shares), no dropout (its masks follow the token order), and every
# part of the layer: hardening and load-balancing losses, master leaf; 4 leaves, 2 per rank at ep_size 2
FFF = ["--arch", "transformer_lm_fff", "--fff-depth", "2", "--fff-leaf-width", "8", "--fff-train-mode", "hard",
       "--fff-hardening", "0.1", "--fff-load-balance", "leaf", "--fff-master-leaf", "--dropout", "0"]
SHARDED = {
    "deepspeed-ep2": ["--fff-backend", "deepspeed"],
    "deepspeed-ep1": ["--fff-backend", "deepspeed", "--fff-ep-size", "1"],  # leaves replicated, reduced by the hook
    "tutel-ep2": ["--fff-backend", "tutel", "--fff-ep-size", "2"],
    "tutel-ep1": ["--fff-backend", "tutel", "--fff-ep-size", "1"],  # a group of one per rank, no all-to-all
}
# a clip norm below every update's gradient norm (the runs log it as gnorm), with plain SGD, whose step follows the
# clipped gradient's size (Adam's would all but undo a common scale); wider leaves and no 512-wide input and output
# projections, so that the leaves hold a few percent of the squared gradient norm (a tenth of a percent otherwise)
CLIP_NORM = 0.05
CLIPPED = ["--clip-norm", str(CLIP_NORM), "--optimizer", "sgd", "--lr", "0.5", "--fff-leaf-width", "128",
           "--decoder-input-dim", "16", "--decoder-output-dim", "16", "--share-decoder-input-output-embed"]


def train_ranks(lm_data_bin: Path, save_dir: Path, *flags: str, max_update: int = 4, nprocs: int = 2) -> str:
    """``nprocs`` ranks of fairseq-train; returns rank 0's output after asserting that every rank succeeded."""
    args = [str(lm_data_bin), "--user-dir", user_dir(), "--save-dir", str(save_dir), *TRAIN, *TINY, *FFF, *flags,
            "--max-update", str(max_update)]
    logs = save_dir.parent / f"{save_dir.name}-logs"
    code = launch(args, logs, nprocs)
    text = (logs / "rank0.log").read_text()
    other = (logs / "rank1.log").read_text() if (logs / "rank1.log").exists() else ""
    assert code == 0, f"rank 0:\n{text[-3000:]}\nrank 1:\n{other[-3000:]}"
    return text


def launch(args: list[str], logs: Path, nprocs: int = 2) -> int:
    """``fff-moe cpu-ranks``' launcher, rank 0's output kept in ``logs/rank0.log``."""
    logs.mkdir(parents=True, exist_ok=True)
    script = ("import sys; from fff_moe_plugin.experiments.lm.launch import run_ranks; "
              f"sys.exit(run_ranks({args!r}, {nprocs}, log_dir={str(logs)!r}))")
    with open(logs / "rank0.log", "w") as out:
        return subprocess.run([sys.executable, "-c", script], stdout=out, stderr=subprocess.STDOUT).returncode


def load(save_dir: Path, name: str = "checkpoint_last.pt") -> dict:
    return torch.load(save_dir / name, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def runs(lm_data_bin, tmp_path_factory):
    """{name: save dir}, each trained once on first use: "core" (data parallel) and the SHARDED cases, each also
    as "<name>-clip" (trained with CLIPPED); rank 0's output is kept in "<save dir>.log"."""
    root = tmp_path_factory.mktemp("runs")
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            base = name.removesuffix("-clip")
            flags = [*SHARDED.get(base, []), *(CLIPPED if name != base else [])]
            log = train_ranks(lm_data_bin, root / name, *flags)
            (root / f"{name}.log").write_text(log)
            done[name] = root / name
        return done[name]

    return get


@pytest.mark.parametrize("name", list(SHARDED))
def test_sharded_leaves_train_exactly_as_the_data_parallel_run(runs, name):
    if name.startswith("tutel"):
        pytest.importorskip("tutel", reason=TUTEL_MISSING)
    reference = load(runs("core"))
    sharded = load(runs(name))
    # the checkpoint is the core layer's: every leaf gathered, and a config that loads in one process
    assert sharded["model"].keys() == reference["model"].keys()
    model_cfg = sharded["cfg"]["model"]
    assert (model_cfg["fff_backend"], model_cfg["fff_ep_size"], model_cfg["fff_capacity_factor"]) == ("core", None, 0)
    assert sharded["extra_state"]["fff_moe"]["ep_size"] == (1 if name.endswith("ep1") else 2)
    # float32, 4 Adam updates, the tokens summed in another order; the attention key biases get a zero
    # gradient up to rounding, which Adam's normalisation blows up to ~1e-4 in both runs alike
    assert_same_state(sharded["model"], reference["model"], rtol=1e-4, atol=2e-4)
    # not vacuous: the leaves of both ranks' shards moved between update 2 and update 4
    earlier = load(runs(name), "checkpoint_1_2.pt")["model"]
    for layer in range(2):
        key = f"decoder.layers.{layer}.ffn.leaves.w1"
        step = (sharded["model"][key] - earlier[key]).abs().flatten(1).amax(1)  # [4 leaves]
        assert step[:2].max() > 1e-4 and step[2:].max() > 1e-4, (key, step)


def gnorms(save_dir: Path) -> list[float]:
    """The gradient norm each update logged (rank 0's train_inner lines)."""
    log = (save_dir.parent / f"{save_dir.name}.log").read_text()
    return [float(json.loads(m.group(1))["gnorm"]) for m in re.finditer(r"\| train_inner \| (\{.*\})", log)]


@pytest.mark.parametrize("name", ["deepspeed-ep2", "tutel-ep2"])
def test_clipped_sharded_run_clips_with_the_data_parallel_norm_and_trains_as_it_does(runs, name):
    # the norm counts every leaf once, as the data-parallel run's does; fairseq's own rule would leave the leaves
    # (tagged param.expert) out of it, and so clip the sharded run's gradients less
    if name.startswith("tutel"):
        pytest.importorskip("tutel", reason=TUTEL_MISSING)
    reference, sharded = runs("core-clip"), runs(f"{name}-clip")
    expected = gnorms(reference)
    assert len(expected) == 4 and min(expected) > CLIP_NORM  # clipping binds at every update
    assert gnorms(sharded) == pytest.approx(expected, abs=2e-3)  # logged to 3 decimals
    reference, sharded = load(reference), load(sharded)
    assert_same_state(sharded["model"], reference["model"], rtol=1e-4, atol=2e-4)


def test_four_ranks_in_two_expert_parallel_groups_train_as_the_data_parallel_run(lm_data_bin, tmp_path):
    # ranks 0-1 and 2-3 each share the leaves; ranks 0 and 2 (1 and 3) hold the same leaves and sum their
    # gradients in the hook; the checkpoint gathers rank 0's group
    reference = load_trained(lm_data_bin, tmp_path / "core4", nprocs=4)
    sharded = load_trained(lm_data_bin, tmp_path / "ep2", "--fff-backend", "deepspeed", "--fff-ep-size", "2", nprocs=4)
    assert sharded["extra_state"]["fff_moe"]["ep_size"] == 2
    assert len(sharded["extra_state"]["fff_moe"]["expert_optimizer_state"]) == 2
    assert_same_state(sharded["model"], reference["model"], rtol=1e-4, atol=2e-4)


def load_trained(lm_data_bin: Path, save: Path, *flags: str, nprocs: int) -> dict:
    train_ranks(lm_data_bin, save, *flags, nprocs=nprocs)
    return load(save)


def test_interrupted_sharded_training_resumes_to_the_same_parameters(lm_data_bin, runs, tmp_path):
    whole = load(runs("deepspeed-ep2"))
    save = tmp_path / "split"
    train_ranks(lm_data_bin, save, *SHARDED["deepspeed-ep2"], max_update=2)  # stops mid-epoch, as an interruption would
    log = train_ranks(lm_data_bin, save, *SHARDED["deepspeed-ep2"], max_update=4)
    assert re.search(r"Loaded checkpoint \S*checkpoint_last\.pt \(epoch 1 @ 2 updates\)", log)
    split = load(save)
    assert split["optimizer_history"][-1]["num_updates"] == 4
    assert_same_state(split["model"], whole["model"], rtol=0, atol=0)
    # each rank's leaves kept their own Adam moments across the restart
    for a, b in zip(whole["extra_state"]["fff_moe"]["expert_optimizer_state"],
                    split["extra_state"]["fff_moe"]["expert_optimizer_state"]):
        assert a.keys() == b.keys() and len(a) > 0
        for key in a:
            for field in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(b[key][field], a[key][field], rtol=0, atol=0)


def test_resume_at_another_ep_size_is_refused_unless_the_optimizer_is_reset(lm_data_bin, runs, tmp_path):
    import shutil

    save = tmp_path / "ep1"
    shutil.copytree(runs("deepspeed-ep2"), save)
    args = [str(lm_data_bin), "--user-dir", user_dir(), "--save-dir", str(save), *TRAIN, *TINY, *FFF,
            *SHARDED["deepspeed-ep1"], "--max-update", "6"]
    assert launch(args, tmp_path / "logs") != 0
    # every rank refuses; the launcher stops the others once the first has exited
    logs = [(tmp_path / "logs" / f"rank{r}.log").read_text() for r in range(2)]
    refusal = "optimizer state was written at --fff-ep-size 2, this run has --fff-ep-size 1"
    assert any(refusal in log for log in logs), logs[0][-2000:]
    train_ranks(lm_data_bin, save, *SHARDED["deepspeed-ep1"], "--reset-optimizer", max_update=6)
    assert load(save)["optimizer_history"][-1]["num_updates"] == 6


def perplexity(lm_data_bin: Path, save: Path) -> float:
    """fairseq-eval-lm on the test split, one process."""
    cmd = fairseq_command("eval_lm") + [str(lm_data_bin), "--path", str(save / "checkpoint_last.pt"), "--user-dir",
                                        user_dir(), "--gen-subset", "test", "--tokens-per-sample", "16",
                                        "--max-tokens", "256", "--cpu", "--num-workers", "0"]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert done.returncode == 0, done.stdout[-3000:]
    return float(re.search(r"Perplexity: ([\d.]+)", done.stdout).group(1))


def test_eval_lm_reads_a_sharded_checkpoint_in_one_process(lm_data_bin, runs):
    reference = perplexity(lm_data_bin, runs("core"))
    assert perplexity(lm_data_bin, runs("deepspeed-ep2")) == pytest.approx(reference, rel=1e-3)


def test_a_capped_run_drops_tokens_and_its_checkpoint_evaluates_dropless(lm_data_bin, tmp_path):
    # capacity factor 0.5: each leaf takes about half its even share of a rank's tokens per layer
    save = tmp_path / "capped"
    log = train_ranks(lm_data_bin, save, "--fff-backend", "deepspeed", "--fff-capacity-factor", "0.5", max_update=2)
    shares = [float(m.group(1)) for m in re.finditer(r'"dropped": "([\d.]+)"', log)]
    assert len(shares) == 2 and all(0 < share < 1 for share in shares), shares
    model_cfg = load(save)["cfg"]["model"]
    assert (model_cfg["fff_backend"], model_cfg["fff_capacity_factor"]) == ("core", 0)
    vocab = len((lm_data_bin / "dict.txt").read_text().splitlines())
    assert 1.0 < perplexity(lm_data_bin, save) < 4 * vocab


@pytest.mark.parametrize("flags, message", [
    (["--fff-backend", "deepspeed"], "--fff-backend deepspeed needs torch.distributed"),
    (["--fff-backend", "tutel", "--fff-ep-size", "2"], "--fff-ep-size 2 is not allowed: must divide the number "
                                                       "of ranks, the world size (1)"),
    (["--fff-backend", "core", "--fff-ep-size", "2"], "--fff-ep-size and --fff-capacity-factor apply to"),
    (["--fff-backend", "deepspeed", "--fff-train-mode", "soft"], "--fff-train-mode soft is not allowed with "
                                                                 "--fff-backend deepspeed"),
    (["--fff-backend", "deepspeed", "--fff-capacity-factor", "-1"], "--fff-capacity-factor -1.0 is not allowed"),
])
def test_bad_backend_flags_fail_at_start_up_naming_the_flag(lm_data_bin, tmp_path, flags, message):
    cmd = fairseq_command("train") + [str(lm_data_bin), "--user-dir", user_dir(), "--save-dir", str(tmp_path), *TRAIN,
                                      *TINY, *FFF, "--cpu", "--max-update", "2", *flags]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert done.returncode != 0
    assert message in done.stdout, done.stdout[-2000:]
    assert "train_inner" not in done.stdout and not list(tmp_path.glob("*.pt"))


def test_the_launcher_shares_the_cores_between_the_ranks_unless_told(monkeypatch):
    from fff_moe_plugin.experiments.lm.launch import rank_environment

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    assert [rank_environment(n)["OMP_NUM_THREADS"] for n in (1, 2, 3, 16)] == ["8", "4", "2", "1"]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert rank_environment(2)["OMP_NUM_THREADS"] == "3"


def test_the_launcher_reads_checkpoints_on_every_rank_once():
    for given in ([], ["--load-checkpoint-on-all-dp-ranks"]):
        cmds = rank_commands(["data", *given], 2, 1234)
        assert [c.count("--load-checkpoint-on-all-dp-ranks") for c in cmds] == [1, 1]


def test_tutel_shares_the_leaves_over_one_rank_or_all_of_them(monkeypatch):
    # Tutel runs its all-to-all's backward on the whole world whatever the group (see TutelFFF)
    from fff_moe_plugin.config import FFFConfig
    from fff_moe_plugin.dispatch import DispatchConfig
    from fff_moe_plugin.integrations.fairseq import sharded

    monkeypatch.setattr(sharded, "world", lambda: (4, 0))
    config = FFFConfig(d_model=16, leaf_width=8, depth=3, train_mode="hard")
    def spec(backend, ep):
        return sharded.ShardSpec(backend, DispatchConfig(ep_size=ep, dropless=True))

    with pytest.raises(ValueError, match=r"--fff-ep-size 2 is not allowed: must be 1 or the number of ranks, the world "
                                         r"size \(4\), with the tutel backend"):
        sharded.check_spec(config, spec("tutel", 2))
    for ep in (1, 4):
        sharded.check_spec(config, spec("tutel", ep))
    sharded.check_spec(config, spec("deepspeed", 2))  # DeepSpeed's groups can be a part of the world
