"""fairseq's transformer decoder with the package's blocks in place of the feedforward (no registration here).

``BlockDecoderLayer`` keeps every part of fairseq's ``TransformerDecoderLayerBase`` (attention, norms,
residual scaling, incremental decoding) and swaps only the feedforward. ``BlockDecoder`` builds those layers
where the layer plan says so and returns every block's :class:`~fff_moe_plugin.block.BlockOutput` beside the
features, in ``extra["block_outputs"]`` ({layer index: BlockOutput}), for the criterion to add the auxiliary
losses and log the routing statistics.
"""

from __future__ import annotations

from typing import Optional

from fairseq.models.transformer import TransformerConfig, TransformerDecoder
from fairseq.modules.fairseq_dropout import FairseqDropout
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase
from torch import Tensor, nn

from ...block import BlockOutput
from ...config import BlockConfig, FFFConfig
from ...registry import build_block
from .flags import counts_size
from .sharded import ShardedFFF, ShardSpec


class BlockDecoderLayer(TransformerDecoderLayerBase):
    """A fairseq decoder layer whose feedforward block is an FFF, sigma-MoE, PKM (or any package) block.

    fairseq's forward computes the feedforward inline as
    ``fc2(ffn_layernorm(activation_dropout(activation_fn(fc1(x)))))`` on time-major ``x [T, B, C]``.
    Here ``fc1`` and ``fc2`` are identities, the activation dropout is off (the blocks have their own
    dropout fields) and ``activation_fn`` is the block, so fairseq's own forward runs unchanged around it.
    The block's output tuple goes to ``sink`` (a dict the decoder provides for the duration of one forward).
    """

    def __init__(self, cfg: TransformerConfig, block: BlockConfig, index: int, no_encoder_attn: bool = False,
                 shard: Optional[ShardSpec] = None):
        if getattr(cfg, "scale_fc", False):
            raise ValueError("--scale-fc normalises the hidden units of the dense feedforward block; the "
                             f"{block.kind} block has none: drop --scale-fc")
        super().__init__(cfg, no_encoder_attn)
        self.index = index
        sharded = shard is not None and isinstance(block, FFFConfig)
        self.ffn = ShardedFFF(block, shard) if sharded else build_block(block)
        self.activation_fn = self.feedforward
        self.activation_dropout_module = FairseqDropout(0.0, module_name=type(self).__name__)
        self.sink: Optional[dict[int, BlockOutput]] = None

    def build_fc1(self, input_dim, output_dim, q_noise, qn_block_size):
        return nn.Identity()

    def build_fc2(self, input_dim, output_dim, q_noise, qn_block_size):
        return nn.Identity()

    def feedforward(self, x: Tensor) -> Tensor:
        # T time, B batch, C model width: x [T, B, C] -> [T, B, C]
        out = self.ffn(x)
        if self.sink is not None:
            self.sink[self.index] = out
        return out.output


class BlockDecoder(TransformerDecoder):
    """fairseq's ``TransformerDecoder`` with a block per layer as ``plan`` says (None keeps the dense layer).

    ``extract_features`` (and so ``forward``) returns ``extra["block_outputs"]``: {layer index: BlockOutput}
    for the block layers that ran, ``extra["block_slots"]``: {layer index: length of stats["counts"]} for every
    block layer, and ``extra["block_nodes"]``: {layer index: shape of its node counts} for every leaf-MLP tree or
    forest, so that statistics
    keep one shape even when LayerDrop skips a layer.
    """

    def __init__(self, args, dictionary, embed_tokens, plan: list[Optional[BlockConfig]], no_encoder_attn=False,
                 shard: Optional[ShardSpec] = None):
        # fairseq's __init__ calls build_decoder_layer once per layer, in order: the plan is read there
        self._plan = list(plan)
        self._shard = shard
        self._built = 0
        super().__init__(args, dictionary, embed_tokens, no_encoder_attn=no_encoder_attn)
        self.block_slots = {i: counts_size(c) for i, c in enumerate(plan) if c is not None}
        self.block_nodes = {i: (c.n_nodes,) if c.n_trees == 1 else (c.n_trees, c.n_nodes)
                            for i, c in enumerate(plan) if isinstance(c, FFFConfig)}

    def build_decoder_layer(self, args, no_encoder_attn=False):
        index = self._built
        self._built += 1
        block = self._plan[index] if index < len(self._plan) else None
        if block is None:
            return super().build_decoder_layer(args, no_encoder_attn)
        return BlockDecoderLayer(TransformerConfig.from_namespace(args), block, index, no_encoder_attn, self._shard)

    def block_layers(self) -> list[BlockDecoderLayer]:
        return [m for m in self.layers if isinstance(m, BlockDecoderLayer)]

    def extract_features(self, prev_output_tokens, encoder_out=None, incremental_state=None,
                         full_context_alignment=False, alignment_layer=None, alignment_heads=None):
        outputs: dict[int, BlockOutput] = {}
        layers = self.block_layers()
        for layer in layers:
            layer.sink = outputs
        try:
            x, extra = super().extract_features(
                prev_output_tokens, encoder_out=encoder_out, incremental_state=incremental_state,
                full_context_alignment=full_context_alignment, alignment_layer=alignment_layer,
                alignment_heads=alignment_heads,
            )
        finally:
            for layer in layers:
                layer.sink = None
        extra["block_outputs"] = outputs
        extra["block_slots"] = self.block_slots
        extra["block_nodes"] = self.block_nodes
        return x, extra
