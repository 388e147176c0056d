"""End to end with the real fairseq tools: fairseq-preprocess, fairseq-train (1 and 2 processes),
fairseq-eval-lm and hub reloading, on a data-bin built here from generated text (width 16, 2 layers)."""

import json
import re
import subprocess

import pytest
import torch

pytest.importorskip("fairseq", reason="needs fairseq: pip install 'fff-moe-plugin[fairseq]'")

from helpers import FAIRSEQ_ARCHS, FAIRSEQ_TINY, FAIRSEQ_TRAIN, assert_same_state  # noqa: E402

from fff_moe_plugin.experiments.lm.data_bin import fairseq_command  # noqa: E402
from fff_moe_plugin.experiments.lm.launch import run_ranks  # noqa: E402
from fff_moe_plugin.integrations.fairseq import user_dir  # noqa: E402

pytestmark = pytest.mark.slow

ARCHS = FAIRSEQ_ARCHS
TINY = FAIRSEQ_TINY
TRAIN = [*FAIRSEQ_TRAIN]


def train(lm_data_bin, save_dir, *args, cpu=True):
    cmd = fairseq_command("train") + [str(lm_data_bin), "--user-dir", user_dir(), "--save-dir", str(save_dir),
                                      *TRAIN, *TINY, *args] + (["--cpu"] if cpu else [])
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert done.returncode == 0, done.stdout[-4000:]
    return done.stdout


def inner_logs(log: str) -> list[dict]:
    return [json.loads(m.group(1)) for m in re.finditer(r"\| train_inner \| (\{.*\})", log)]


@pytest.fixture(scope="module")
def trained(lm_data_bin, tmp_path_factory):
    """Each architecture trained once for 12 updates: {name: (log, save_dir)}."""
    runs = {}
    for name, flags in ARCHS.items():
        save = tmp_path_factory.mktemp(name)
        runs[name] = (train(lm_data_bin, save, *flags, "--max-update", "12"), save)
    return runs


@pytest.mark.parametrize("name", list(ARCHS))
def test_architecture_trains_loss_drops_and_eval_lm_reads_the_checkpoint(lm_data_bin, trained, name):
    log, save = trained[name]
    logs = inner_logs(log)
    assert len(logs) == 12
    assert float(logs[-1]["nll_loss"]) < float(logs[0]["nll_loss"]) - 0.5
    assert "usage_entropy" in logs[-1] and "unused" in logs[-1]
    if name == "fff":
        assert float(logs[-1]["aux_loss"]) > 0 and "aux_load_balance" in logs[-1]
        # the decision balance of each level, at every log interval: a collapse shows when it starts
        assert all(0 <= float(entry[f"imbalance_l{k}"]) <= 1 for entry in logs for k in (0, 1))
    cmd = fairseq_command("eval_lm") + [str(lm_data_bin), "--path", str(save / "checkpoint_last.pt"), "--user-dir",
                                        user_dir(), "--gen-subset", "test", "--tokens-per-sample", "16",
                                        "--max-tokens", "256", "--cpu", "--num-workers", "0"]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert done.returncode == 0, done.stdout[-3000:]
    ppl = float(re.search(r"Perplexity: ([\d.]+)", done.stdout).group(1))
    vocab = len((lm_data_bin / "dict.txt").read_text().splitlines())
    assert 1.0 < ppl < vocab  # better than uniform over the words


def test_checkpoint_reloads_with_from_pretrained_and_samples(lm_data_bin, trained):
    from fairseq.models.transformer_lm import TransformerLanguageModel

    from fff_moe_plugin.integrations.fairseq.models import FFFLanguageModel

    _, save = trained["fff"]
    lm = TransformerLanguageModel.from_pretrained(str(save), "checkpoint_last.pt", data_name_or_path=str(lm_data_bin),
                                                  user_dir=user_dir())
    assert isinstance(lm.models[0], FFFLanguageModel)
    ckpt = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert_same_state(lm.models[0].state_dict(), ckpt["model"])
    # sampling with fairseq's SequenceGenerator through the task, as fairseq-generate does (the hub's .sample(),
    # fairseq-interactive and fairseq-generate themselves: test_fairseq_sampling.py)
    from fairseq import search
    from fairseq.sequence_generator import SequenceGenerator

    d = lm.task.target_dictionary
    prompt = torch.tensor([[d.eos()] + [d.index(w) for w in "the cat".split()]])
    generator = SequenceGenerator(lm.models, d, beam_size=1, max_len_b=6,
                                  search_strategy=search.Sampling(d, sampling_topk=5))
    hypo = lm.task.inference_step(generator, lm.models, {"net_input": {"src_tokens": prompt,
                                                                      "src_lengths": torch.tensor([3])}})[0][0]
    words = d.string(hypo["tokens"]).split()
    assert words[:2] == ["the", "cat"] and len(words) > 2


def test_interrupted_training_resumes_to_the_same_parameters(lm_data_bin, tmp_path):
    flags = [*ARCHS["fff"], "--fff-region-leak", "0.1", "--dropout", "0.1", "--save-interval-updates", "3"]
    train(lm_data_bin, tmp_path / "whole", *flags, "--max-update", "8")
    train(lm_data_bin, tmp_path / "split", *flags, "--max-update", "4")  # stops mid-epoch, as an interruption would
    log = train(lm_data_bin, tmp_path / "split", *flags, "--max-update", "8")
    assert re.search(r"Loaded checkpoint \S*checkpoint_last\.pt \(epoch 1 @ 4 updates\)", log)
    a = torch.load(tmp_path / "whole" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "split" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == 8
    assert_same_state(b["model"], a["model"], rtol=0, atol=0)


def test_bias_balanced_training_moves_the_shifts_and_resumes_them(lm_data_bin, tmp_path):
    flags = ["--arch", "transformer_lm_fff", "--fff-depth", "2", "--fff-leaf-width", "8", "--fff-train-mode", "hard",
             "--fff-load-balance", "bias", "--fff-bias-update-rate", "0.01", "--dropout", "0",
             "--save-interval-updates", "3"]
    train(lm_data_bin, tmp_path / "whole", *flags, "--max-update", "6")
    train(lm_data_bin, tmp_path / "split", *flags, "--max-update", "3")
    train(lm_data_bin, tmp_path / "split", *flags, "--max-update", "6")
    a = torch.load(tmp_path / "whole" / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"]
    b = torch.load(tmp_path / "split" / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"]
    shifts = [k for k in a if k.endswith("router.balance_bias")]
    assert len(shifts) == 2 and not any(k.endswith("balance_counts") for k in a)
    for k in shifts:
        steps = a[k] / 0.01  # 6 updates of +-0.01 each (or none, for a node no token reached)
        assert (a[k] != 0).any() and torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 6
    assert_same_state(b, a, rtol=0, atol=0)
    # --fff-bias-gate shifted reaches the layers, travels in the checkpoint and trains another function
    train(lm_data_bin, tmp_path / "shifted", *flags, "--fff-bias-gate", "shifted", "--max-update", "6")
    c = torch.load(tmp_path / "shifted" / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"]
    assert [v["config"]["bias_gate"] for k, v in c.items() if k.endswith("ffn._extra_state")] == ["shifted"] * 2
    assert [v["config"]["bias_gate"] for k, v in a.items() if k.endswith("ffn._extra_state")] == ["unshifted"] * 2
    assert not torch.equal(c["decoder.layers.0.ffn.leaves.w1"], a["decoder.layers.0.ffn.leaves.w1"])


def test_the_soft_to_hard_switch_resumes_from_a_checkpoint_saved_before_it(lm_data_bin, tmp_path):
    flags = ["--arch", "transformer_lm_fff", "--fff-depth", "2", "--fff-leaf-width", "8", "--fff-train-mode", "hard",
             "--fff-soft-updates", "3", "--fff-hardening", "0.1", "--fff-load-balance", "leaf", "--dropout", "0",
             "--save-interval-updates", "2"]
    train(lm_data_bin, tmp_path / "whole", *flags, "--max-update", "6")
    train(lm_data_bin, tmp_path / "split", *flags, "--max-update", "2")  # saved in the soft phase
    log = train(lm_data_bin, tmp_path / "split", *flags, "--max-update", "6")
    assert re.search(r"Loaded checkpoint \S*checkpoint_last\.pt \(epoch 1 @ 2 updates\)", log)
    a = torch.load(tmp_path / "whole" / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"]
    b = torch.load(tmp_path / "split" / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"]
    assert [int(v) for k, v in a.items() if k.endswith("router.num_updates")] == [6, 6]
    assert_same_state(b, a, rtol=0, atol=0)
    # against a run that never trained soft: the first three updates made a difference
    train(lm_data_bin, tmp_path / "hard", *[f for f in flags if f not in ("--fff-soft-updates", "3")],
          "--max-update", "6")
    c = torch.load(tmp_path / "hard" / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"]
    assert not torch.equal(c["decoder.layers.0.ffn.leaves.w1"], a["decoder.layers.0.ffn.leaves.w1"])


def test_a_forest_trains_with_fairseq_and_its_checkpoint_evaluates(lm_data_bin, tmp_path):
    flags = ["--arch", "transformer_lm_fff", "--fff-trees", "3", "--fff-depth", "1", "--fff-train-mode", "hard",
             "--fff-load-balance", "leaf", "--max-update", "6"]
    log = train(lm_data_bin, tmp_path, *flags)
    logs = inner_logs(log)
    assert len(logs) == 6 and float(logs[-1]["nll_loss"]) < float(logs[0]["nll_loss"])
    assert all(0 <= float(entry["imbalance_l0"]) <= 1 for entry in logs)
    model = torch.load(tmp_path / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"]
    assert model["decoder.layers.0.ffn.router.node_weight"].shape == (3, 16)  # 3 trees of 1 node
    assert model["decoder.layers.0.ffn.leaves.w1"].shape[0] == 6  # 3 trees of 2 leaves
    cmd = fairseq_command("eval_lm") + [str(lm_data_bin), "--path", str(tmp_path / "checkpoint_last.pt"),
                                        "--user-dir", user_dir(), "--gen-subset", "test", "--tokens-per-sample", "16",
                                        "--max-tokens", "256", "--cpu", "--num-workers", "0"]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert done.returncode == 0 and "Perplexity" in done.stdout, done.stdout[-2000:]


def test_bad_flag_fails_fairseq_train_at_start_up_naming_the_flag(lm_data_bin, tmp_path):
    cmd = fairseq_command("train") + [str(lm_data_bin), "--user-dir", user_dir(), "--save-dir", str(tmp_path), *TRAIN,
                                      *TINY, "--cpu", "--arch", "transformer_lm_fff", "--fff-depth", "-2",
                                      "--fff-leaf-width", "8", "--max-update", "3"]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert done.returncode != 0
    assert "--fff-depth -2 is not allowed" in done.stdout
    assert "train_inner" not in done.stdout and not list(tmp_path.glob("*.pt"))


def test_two_cpu_processes_train_and_log_metrics_merged_over_ranks(lm_data_bin, tmp_path, capfd):
    # with bias balancing beside the leaf loss: the trainer hook all-reduces the counts over the two ranks
    args = [str(lm_data_bin), "--user-dir", user_dir(), "--save-dir", str(tmp_path / "ckpt"), *TRAIN, *TINY,
            *ARCHS["fff"], "--fff-train-mode", "hard", "--fff-bias-update-rate", "0.01", "--max-update", "3"]
    assert run_ranks(args, 2, log_dir=str(tmp_path)) == 0
    logs = inner_logs(capfd.readouterr().out)
    assert len(logs) == 3
    # each rank reads --max-tokens 256; the logged batch is both ranks' tokens, and the routing statistics
    # come from counts summed over both
    assert all(float(entry["wpb"]) == 512 for entry in logs)
    assert all("usage_entropy" in entry for entry in logs)
    model = torch.load(tmp_path / "ckpt" / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"]
    assert any((v != 0).any() for k, v in model.items() if k.endswith("router.balance_bias"))
