"""The criterion ``cross_entropy_fff``: cross-entropy plus the blocks' auxiliary losses, with routing stats.

fairseq's losses are sums over tokens (later divided by ``sample_size``), while a block's ``aux_loss`` is a
batch mean, so it is added as ``sample_size * aux_loss``: its weight in the gradient is then exactly the
coefficient set in the block config. Logged (train and valid):

- ``loss``: what is minimised (cross-entropy + auxiliary), ``nll_loss`` and ``ppl``: cross-entropy only;
- ``aux_loss`` and ``aux_<term>`` (e.g. ``aux_hardening``, ``aux_load_balance``, ``aux_entropy``): the
  weighted sum and each unweighted term, averaged over the block layers;
- ``usage_entropy`` (nats) and ``unused``: entropy of the token counts per leaf / expert / slot, and how
  many of them got no token, averaged over the block layers. Counts are summed over sub-batches and over
  workers before the entropy is taken, so a distributed run logs the statistics of its whole batch;
- ``dropped`` (sharded FFF blocks, ``--fff-backend deepspeed|tutel``): the share of the tokens dropped by a
  capped capacity, averaged over the block layers (0 when dropless);
- ``imbalance_l<k>`` (leaf-MLP trees): how one-sided the decisions of level k are, 0 (every node splits its tokens
  evenly) to 1 (every node sends all of them one way: a collapse), from node counts summed over sub-batches and
  workers (:func:`~fff_moe_plugin.losses.level_imbalance`), averaged over the tree layers. A collapse shows here
  when it starts, at every ``--log-interval``;
- ``gnorm_nodes`` and ``gnorm_leaves`` (train, leaf-MLP trees): the norm of the gradient applied to all the trees'
  node neurons and to their leaves, after fairseq's clipping (:func:`log_tree_gradient_norms`); nodes that stop
  learning show here.

No ``from __future__ import annotations`` here: fairseq reads the dataclass field types at run time.
"""

import math
from dataclasses import dataclass

import torch
from fairseq import utils
from fairseq.criterions import register_criterion
from fairseq.criterions.cross_entropy import CrossEntropyCriterion
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics
from omegaconf import II

from ...losses import level_imbalance, usage_entropy

COUNTS = "counts_"  # logging keys "counts_<layer>" carry the per-layer token counts
NODES = "nodes_"  # and "nodes_<layer>" a tree layer's [2, N] node counts (reached, went right)
TERMS = "aux_"


@dataclass
class CrossEntropyFFFConfig(FairseqDataclass):
    sentence_avg: bool = II("optimization.sentence_avg")


@register_criterion("cross_entropy_fff", dataclass=CrossEntropyFFFConfig)
class CrossEntropyFFFCriterion(CrossEntropyCriterion):
    """Cross-entropy + ``sample_size * sum of the blocks' aux_loss``; for any model, with or without blocks."""

    def forward(self, model, sample, reduce=True):
        net_output = model(**sample["net_input"])
        nll, _ = self.compute_loss(model, net_output, sample, reduce=reduce)
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        extra = net_output[1] if isinstance(net_output[1], dict) else {}
        outputs = extra.get("block_outputs", {})
        slots = extra.get("block_slots", {})
        trees = extra.get("block_nodes", {})

        aux = nll.new_zeros((), dtype=torch.float32)
        terms: dict[str, torch.Tensor] = {}
        for out in outputs.values():
            aux = aux + out.aux_loss
            for name, value in out.losses.items():
                terms[name] = terms.get(name, 0.0) + value.detach()
        loss = nll + sample_size * aux.to(nll.dtype) if reduce else nll

        logging_output = {
            "loss": loss.data,
            "nll_loss": nll.data,
            "aux_loss": aux.data * sample_size,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        n_layers = max(1, len(outputs))
        for name, value in terms.items():
            logging_output[TERMS + name] = value * sample_size / n_layers
        # blocks with capped capacity (--fff-backend deepspeed|tutel) count the tokens they dropped
        dropped = [out.stats["dropped"] for out in outputs.values() if "dropped" in out.stats]
        if dropped:
            logging_output["dropped"] = sum(d.detach().float() for d in dropped) / len(dropped)
        # one counts vector per block layer, zeros for a layer LayerDrop skipped: every worker logs the same keys
        for index, size in slots.items():
            counts = outputs[index].stats["counts"] if index in outputs else nll.new_zeros(size)
            logging_output[f"{COUNTS}{index}"] = counts.detach().float()
        for index, shape in trees.items():
            nodes = outputs[index].stats["node_counts"] if index in outputs else nll.new_zeros(2, *shape)
            logging_output[f"{NODES}{index}"] = nodes.detach().float()
        return loss, sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        def total(key):
            return sum(log.get(key, 0) for log in logging_outputs)

        loss_sum, nll_sum = total("loss"), total("nll_loss")
        ntokens, sample_size = total("ntokens"), total("sample_size")
        if sample_size == 0:
            return
        metrics.log_scalar("loss", loss_sum / sample_size / math.log(2), sample_size, round=3)
        metrics.log_scalar("nll_loss", nll_sum / max(ntokens, 1) / math.log(2), ntokens, round=3)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))

        keys = set().union(*(log.keys() for log in logging_outputs)) if logging_outputs else set()
        if not any(k.startswith(COUNTS) for k in keys):
            return  # a model without blocks: plain cross-entropy
        metrics.log_scalar("aux_loss", total("aux_loss") / sample_size, sample_size, round=4)
        if "dropped" in keys:  # share of the tokens a block dropped, averaged over the block layers
            metrics.log_scalar("dropped", total("dropped") / max(ntokens, 1), ntokens, round=4)
        for key in sorted(k for k in keys if k.startswith(TERMS)):
            metrics.log_scalar(key, total(key) / sample_size, sample_size, round=4)
        entropies, unused = [], []
        for key in sorted(k for k in keys if k.startswith(COUNTS)):
            counts = torch.as_tensor(total(key), dtype=torch.float64)
            entropies.append(float(usage_entropy(counts)))
            unused.append(float((counts == 0).sum()))
        metrics.log_scalar("usage_entropy", sum(entropies) / len(entropies), 1, round=3)
        metrics.log_scalar("unused", sum(unused) / len(unused), 1, round=2)
        levels: dict[int, list[float]] = {}
        for key in sorted(k for k in keys if k.startswith(NODES)):
            for level, value in enumerate(level_imbalance(torch.as_tensor(total(key), dtype=torch.float64))):
                levels.setdefault(level, []).append(float(value))
        for level, values in sorted(levels.items()):
            metrics.log_scalar(f"imbalance_l{level}", sum(values) / len(values), 1, round=3)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        # every value, the counts vectors included, is a sum over tokens: fairseq's fast all-reduce adds them
        return True


def log_tree_gradient_norms(model: torch.nn.Module) -> None:
    """Log ``gnorm_nodes`` and ``gnorm_leaves``: the norms of the gradients the last update applied to every tree's
    node neurons and to its leaves (the master leaf aside; with sharded leaves, this rank's). Called after fairseq's
    ``train_step``, whose gradients stay in place until the next step zeroes them. No tree, nothing logged."""
    from ...leaves import LeafBank, LeafMLP, MasterLeaf
    from ...router import TreeRouter

    nodes: list[torch.Tensor] = []
    leaves: list[torch.Tensor] = []
    for m in model.modules():
        if isinstance(m, TreeRouter):
            nodes += [p.grad for p in m.parameters(recurse=False) if p.grad is not None]
        elif isinstance(m, LeafBank) or (isinstance(m, LeafMLP) and not isinstance(m, MasterLeaf)):
            leaves += [p.grad for p in m.parameters(recurse=False) if p.grad is not None]
    for key, grads in (("gnorm_nodes", nodes), ("gnorm_leaves", leaves)):
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            # a tensor, as fairseq logs its own gnorm: the meter reads it on the host only when the log prints, so
            # a GPU step waits for no copy
            metrics.log_scalar(key, norm.detach(), weight=1, round=4)
