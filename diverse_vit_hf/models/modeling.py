"""Image classifiers of the ViT family (ViT, DeiT, DINOv2, DINOv2 with registers, BEiT, ViT-MSN, I-JEPA, and timm's
ViTs through transformers' TimmWrapper) that expose what the Diverse-ViT regularizers need.

Each `Diverse*ForImageClassification` has exactly the parameters of its stock parent, loads any checkpoint of that
family with `from_pretrained`, and saves *plain* checkpoints (`config.json` names the stock architecture), so a
diversified model runs in vanilla `transformers`, `pipeline("image-classification")` and Hub inference widgets without
remote code.

With `return_diversity_outputs=True` the forward also returns `h^0`, the pre-LayerNorm `h^L`, block 1's
attention query and key (from which its probabilities follow) and per-token logits. Every block keeps the configured
fast kernel (SDPA, flash, ...), which never builds the `(B, H, N, N)` probabilities: the attention term computes them
from the captured query and key, one chunk of images at a time, taking their gradient at once
(`attention_cosine_loss_from_scores`). The capture goes through transformers' `AttentionInterface`: a registered
function records the query and key of the one flagged module and delegates every module to the base implementation.
The flag stays set once installed, so activation-checkpoint recomputation takes the same path as the forward.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    BeitForImageClassification,
    DeiTForImageClassification,
    Dinov2ForImageClassification,
    Dinov2WithRegistersForImageClassification,
    IJepaForImageClassification,
    PretrainedConfig,
    TimmWrapperForImageClassification,
    ViTForImageClassification,
    ViTMSNForImageClassification,
)
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface, PreTrainedModel

from ..losses.mixing import check_patch_grid
from ..losses.regularizers import (
    TwoLabelTargets,
    attention_cosine_loss_from_scores,
    linear_two_label_cross_entropy_sum,
    soft_target_cross_entropy,
    softmax_attention,
)
from ..utils.distributed import full_weight
from ..utils.fileio import atomic_write_text
from .families import attention_module, backbone_layers, embeddings_output, final_norm, qkv_weights
from .timm_vit import (
    TIMM_CONFIG_ATTRIBUTES,
    check_timm_vision_transformer,
    default_pretrained_cfg,
    set_timm_drop_path_rate,
    timm_config_attributes,
    timm_token_head_parts,
    uses_reentrant_checkpointing,
)

BLOCK1_CAPTURE_PREFIX = "diverse_vit_block1_capture+"


@dataclass
class AttentionScores:
    """What a block's attention probabilities are computed from: `softmax(query key^T * scaling + bias)`.

    Attributes:
        query, key: `(B, H, N, d)` after any query/key norm, as the attention kernel receives them.
        scaling: the factor on the dot products.
        bias: the additive mask the kernel receives (BEiT's relative position bias), broadcastable to
            `(B, H, N, N)`, or None.
    """

    query: torch.Tensor
    key: torch.Tensor
    scaling: float
    bias: torch.Tensor | None = None

    def probabilities(self) -> torch.Tensor:
        """`(B, H, N, N)` the softmax probabilities (`softmax_attention`)."""
        return softmax_attention(self.query, self.key, self.scaling, self.bias)

    def cosine_loss(self) -> torch.Tensor:
        """The attention term on these probabilities, built one chunk of images at a time and never kept
        (`attention_cosine_loss_from_scores`)."""
        return attention_cosine_loss_from_scores(self.query, self.key, self.scaling, self.bias)


@dataclass
class DiverseImageClassifierOutput(ImageClassifierOutput):
    """`ImageClassifierOutput` plus the tensors the Diverse-ViT regularizers read.

    Attributes:
        loss: image-level cross-entropy of `logits` against `labels` (hard or soft), when labels are given.
        logits: `(B, C)` the image logits, exactly as the stock class computes them (CLS token, or the family's
            pooled head).
        first_hidden_state: `(B, N, D)` `h^0`, the tokens entering block 1 (embeddings after dropout).
        last_block_hidden_state: `(B, N, D)` `h^L`, the last block's output before the final norm.
        first_block_attention: block 1's attention query and key (`AttentionScores`); its softmax probabilities,
            before dropout, are `first_block_attention_probs` `(B, H, N, N)`, computed on access.
        token_logits: `(B, N, C)` the head applied to every token (per family, see `token_head_parts`); the
            patch-wise mixing loss reads the patch entries `[:, K:]`. None when the forward was asked not to build
            them (`return_token_logits=False`).
        token_loss: `()` float32, the two-label cross-entropy of the per-token logits summed over every token
            (`linear_two_label_cross_entropy_sum`), when the forward was given `token_targets`; the logits it reads
            are never built whole.
    """

    first_hidden_state: torch.FloatTensor | None = None
    last_block_hidden_state: torch.FloatTensor | None = None
    first_block_attention: AttentionScores | None = None
    token_logits: torch.FloatTensor | None = None
    token_loss: torch.FloatTensor | None = None

    @property
    def first_block_attention_probs(self) -> torch.Tensor | None:
        """`(B, H, N, N)` block 1's softmax attention probabilities before dropout, computed from its query and key on
        each access (the attention kernel does not build them)."""
        return None if self.first_block_attention is None else self.first_block_attention.probabilities()


@dataclass
class TokenHead:
    """A family's classification head in the form the per-token logits need: the image logits, and the per-token
    logits as one linear map of per-token features, `token_logits = features @ weight.T + bias`.

    Attributes:
        logits: `(B, C)` the image logits, as the stock class computes them.
        features: `(B, N, D_head)` the head's input for every token.
        weight: `(C, D_head)` the head's weight (or the part of it that reads a token).
        bias: `(C,)` the head's bias, `(B, C)` a bias per sample (the part of the head that reads the CLS token, for
            DINOv2), or None.
    """

    logits: torch.Tensor
    features: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None

    def token_logits(self) -> torch.Tensor:
        """`(B, N, C)` the per-token logits."""
        logits = F.linear(self.features, self.weight)
        if self.bias is None:
            return logits
        return logits + (self.bias.unsqueeze(1) if self.bias.ndim == 2 else self.bias)

    def token_loss(self, targets: TwoLabelTargets) -> torch.Tensor:
        """`()` the two-label cross-entropy of the per-token logits summed over every token, without building them
        (`linear_two_label_cross_entropy_sum`)."""
        return linear_two_label_cross_entropy_sum(self.features, self.weight, self.bias, targets)


def linear_head(classifier: nn.Module) -> nn.Linear:
    """The classifier as the linear layer the per-token logits need; a clear error for a headless model."""
    if not isinstance(classifier, nn.Linear):
        raise ValueError(
            f"The classifier is a {type(classifier).__name__}, not a linear layer: per-token logits need a model with "
            "a classification head (load it with num_labels > 0)."
        )
    return classifier


def diversity_output(
    head: TokenHead,
    labels: torch.Tensor | None,
    first: torch.Tensor,
    last: torch.Tensor,
    attention: AttentionScores,
    token_targets: TwoLabelTargets | None,
    return_token_logits: bool,
) -> DiverseImageClassifierOutput:
    """The diversified forward's output from its head and the captured `h^0`, `h^L` and block-1 attention: the
    per-token logits built only when asked for, the per-token loss only when given targets."""
    return DiverseImageClassifierOutput(
        loss=soft_target_cross_entropy(head.logits, labels) if labels is not None else None,
        logits=head.logits,
        first_hidden_state=first,
        last_block_hidden_state=last,
        first_block_attention=attention,
        token_logits=head.token_logits() if return_token_logits else None,
        token_loss=head.token_loss(token_targets) if token_targets is not None else None,
    )


def eager_attention_with_probs(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention returning the softmax probabilities *before* dropout (what the loss needs).

    Args:
        query, key, value: `(B, H, N, d)`.
        attention_mask: additive mask broadcastable to `(B, H, N, N)`, or None.

    Returns:
        `(attn_output (B, N, H, d), probs (B, H, N, N))`.
    """
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    probs = softmax_attention(query, key, scaling, attention_mask)
    weights = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), probs


def register_block1_capture_attention(base_implementation: str) -> str:
    """Register (once) an attention function that records the query and key (`AttentionScores`) of the module
    flagged with `_diverse_capture_attention` in its `_diverse_attention_sink`, when one is set, and runs
    `base_implementation` for every module. Returns its registered name."""
    name = BLOCK1_CAPTURE_PREFIX + base_implementation
    if name in ALL_ATTENTION_FUNCTIONS:
        return name

    def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        sink = getattr(module, "_diverse_attention_sink", None)
        if sink is not None and getattr(module, "_diverse_capture_attention", False):
            sink.append(AttentionScores(query, key, query.shape[-1] ** -0.5 if scaling is None else scaling,
                                        attention_mask))  # fmt: skip
        if base_implementation == "eager":
            output, _ = eager_attention_with_probs(module, query, key, value, attention_mask, dropout, scaling)
            return output, None
        base = ALL_ATTENTION_FUNCTIONS[base_implementation]
        return base(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    AttentionInterface.register(name, attention_forward)
    return name


def _sink_output(module: nn.Module, args: Any, output: Any) -> None:
    """Forward hook: append the module's output to its `_diverse_sink`, when a diversity forward has set one."""
    sink = getattr(module, "_diverse_sink", None)
    if sink is not None:
        sink.append(output[0] if isinstance(output, tuple) else output)


def _sink_input(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: append the module's first input to its `_diverse_sink`, when one is set."""
    sink = getattr(module, "_diverse_sink", None)
    if sink is not None:
        sink.append(args[0])


def _stock_class_name(model: nn.Module) -> str:
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers."):
            return cls.__name__
    raise TypeError(f"{type(model).__name__} has no transformers base class.")


class BranchDropout(nn.Module):
    """Dropout, then stochastic depth (drop path), on a residual branch's output. No parameters or buffers.

    HF's ViT-family layers apply their `dropout` module to exactly the two residual branches (attention and MLP)
    right before the residual add, so putting this module in its place gives `x + drop_path(dropout(f(x)))`,
    as in timm/DeiT, without changing the parameter layout: checkpoints stay plain checkpoints of the stock class.

    Args:
        dropout: element-wise dropout probability (the config's `hidden_dropout_prob`).
        drop_path: probability of dropping the whole branch for a sample; kept branches are scaled by
            `1 / (1 - drop_path)`.
    """

    def __init__(self, dropout: float, drop_path: float) -> None:
        super().__init__()
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop path rate must lie in [0, 1), got {drop_path}.")
        self.dropout = dropout
        self.drop_path = drop_path

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`(B, N, D) -> (B, N, D)`."""
        hidden_states = F.dropout(hidden_states, p=self.dropout, training=self.training)
        if not self.training or self.drop_path == 0.0:
            return hidden_states
        keep = 1.0 - self.drop_path
        mask_shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        mask = hidden_states.new_empty(mask_shape).bernoulli_(keep)
        return hidden_states * mask / keep

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}, drop_path={self.drop_path}"


class DiverseModelMixin:
    """Shared behaviour of the diverse classifiers. Each family class sets `num_prefix_tokens` (or computes it from
    the config) and, where its head is not "the head on the CLS token", overrides `token_head`."""

    num_prefix_tokens: int
    base_model_prefix: str
    config: PretrainedConfig
    classifier: nn.Module
    # DINOv2 interpolates its position embeddings for every input size; the others only when asked.
    always_interpolates_pos_encoding: bool = False

    @property
    def backbone(self) -> nn.Module:
        """The backbone model inside the classifier (`ViTModel`, `DeiTModel`, `Dinov2Model`, ...)."""
        return getattr(self, self.base_model_prefix)

    @property
    def diversity_layers(self) -> nn.ModuleList:
        """The backbone's transformer blocks, in order."""
        return backbone_layers(self.backbone)

    def attention_projection_weights(self) -> torch.Tensor:
        """The query, key and value weights of every block, stacked for one batched call. Under FSDP2 each shard is
        all-gathered differentiably first (`distributed.full_weight`), so the result is always the full matrices.

        Returns:
            `(3 * L, D_attn, D)` in block order `[Q_1, K_1, V_1, Q_2, ...]`.
        """
        return torch.stack([weight for layer in self.diversity_layers for weight in qkv_weights(layer, full_weight)])

    def set_drop_path_rate(self, drop_path_rate: float) -> list[float]:
        """Enable stochastic depth with the DeiT/timm schedule: rate `i / (L - 1) * drop_path_rate` for block i.

        Adds no parameters (see `BranchDropout`); the saved checkpoint is unchanged. Families with their own
        drop-path slot (DINOv2, BEiT) get it there, with no extra dropout; ViT-style blocks get it in the
        residual-branch dropout. Call again with 0 to turn it off. Returns the per-block rates.
        """
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"`drop_path_rate` must lie in [0, 1) (DeiT uses 0.1), got {drop_path_rate}.")
        layers = self.diversity_layers
        rates = torch.linspace(0.0, drop_path_rate, len(layers)).tolist() if len(layers) > 1 else [drop_path_rate]
        for layer, rate in zip(layers, rates, strict=True):
            if hasattr(layer, "drop_path"):
                layer.drop_path = BranchDropout(0.0, rate).train(layer.training)
            else:
                layer.dropout = BranchDropout(self.config.hidden_dropout_prob, rate).train(layer.training)
        return rates

    def install_block1_attention_capture(self) -> None:
        """Route attention through the capturing function (block 1's query and key recorded, every block on the
        current kernel) and hook the embeddings (`h^0`) and the final norm's input (`h^L`). Done once (the trainer
        calls it before any compilation): the hooks only write into a sink while a diversity forward has set one,
        so a compiled forward traces them without graph breaks."""
        implementation = self.config._attn_implementation or "sdpa"
        if not implementation.startswith(BLOCK1_CAPTURE_PREFIX):
            self.set_attn_implementation(register_block1_capture_attention(implementation))
        attention_module(self.diversity_layers[0])._diverse_capture_attention = True
        backbone = self.backbone
        embeddings = embeddings_output(backbone)
        if not getattr(embeddings, "_diverse_hooked", False):
            embeddings.register_forward_hook(_sink_output)
            embeddings._diverse_hooked = True
        norm = final_norm(backbone)
        if not getattr(norm, "_diverse_hooked", False):
            norm.register_forward_pre_hook(_sink_input)
            norm._diverse_hooked = True

    def check_image_batch(self, pixel_values: torch.Tensor | None, channel_advice: str = "") -> tuple[int, int]:
        """The checks every family shares: a `(B, C, H, W)` tensor with the model's channel count whose sides tile
        into patches. Returns `(H, W)`; `channel_advice` ends the channel-count message."""
        if pixel_values is None:
            raise ValueError("`pixel_values` is required: a (batch, channels, height, width) tensor of images.")
        if pixel_values.ndim != 4:
            raise ValueError(
                f"`pixel_values` must have shape (batch, channels, height, width), got {tuple(pixel_values.shape)}."
            )
        channels, height, width = pixel_values.shape[1:]
        if channels != self.config.num_channels:
            raise ValueError(
                f"The model expects {self.config.num_channels}-channel images but got {channels} channels. Convert "
                f"the images (e.g. PIL `image.convert('RGB')`){' ' + channel_advice if channel_advice else ''}."
            )
        check_patch_grid(height, width, self.config.patch_size)
        return height, width

    def check_pixel_values(self, pixel_values: torch.Tensor | None, interpolate_pos_encoding: bool | None) -> None:
        """Raise a clear `ValueError` for images this model cannot take."""
        height, width = self.check_image_batch(pixel_values, "or build the model with a matching `num_channels`")
        if self.always_interpolates_pos_encoding:
            return
        expected = self.config.image_size
        expected = (expected, expected) if isinstance(expected, int) else tuple(expected)
        if (height, width) != expected and not interpolate_pos_encoding:
            raise ValueError(
                f"The model was built for {expected[0]}x{expected[1]} images but got {height}x{width}. Resize the "
                "images with the model's image processor, or pass `interpolate_pos_encoding=True`."
            )

    def token_head_parts(self, sequence_output: torch.Tensor) -> TokenHead:
        """The image logits and the per-token logits' linear form, from the backbone's final (normalised) tokens.

        Default (ViT, DeiT, ViT-MSN): the head reads the CLS token, so the per-token logits are the head applied to
        every token, `z_t = W h_t + b`, and the image logits are the stock ones, the head on token 0.

        Args:
            sequence_output: `(B, N, D)` the backbone's `last_hidden_state`.
        """
        head = linear_head(self.classifier)
        return TokenHead(head(sequence_output[:, 0]), sequence_output, head.weight, head.bias)

    def token_head(self, sequence_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(logits (B, C), token_logits (B, N, C))` from `sequence_output` `(B, N, D)` (see `token_head_parts`)."""
        head = self.token_head_parts(sequence_output)
        return head.logits, head.token_logits()

    def backbone_kwargs(self, interpolate_pos_encoding: bool | None) -> dict[str, Any]:
        """Keyword arguments of the backbone's forward for the regularizers' pass."""
        return {"interpolate_pos_encoding": bool(interpolate_pos_encoding)}

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_diversity_outputs: bool = False,
        token_targets: TwoLabelTargets | None = None,
        return_token_logits: bool = True,
        **kwargs: Any,
    ) -> ImageClassifierOutput | DiverseImageClassifierOutput:
        """Classify images; optionally also return the regularizers' inputs.

        Args:
            pixel_values: `(B, C, H, W)` images.
            labels: `(B,)` class indices or `(B, num_labels)` soft targets. Soft targets use a soft-target
                cross-entropy and never switch the config to multi-label (the stock forward would).
            interpolate_pos_encoding: interpolate position embeddings for other image sizes.
            return_diversity_outputs: also return `h^0`, pre-norm `h^L`, block-1 attention probabilities and
                per-token logits (a `DiverseImageClassifierOutput`). Without it the forward is the stock one.
            token_targets: with `return_diversity_outputs`, per-token targets (`TwoLabelTargets` over the N tokens):
                the output's `token_loss` is then their summed cross-entropy, computed without building the
                `(B, N, C)` per-token logits (what the patch-wise loss uses).
            return_token_logits: with `return_diversity_outputs`, build the `(B, N, C)` per-token logits
                (`token_logits`); False leaves them out (None).
        """
        self.check_pixel_values(pixel_values, interpolate_pos_encoding)
        soft_labels = labels is not None and labels.is_floating_point()
        if not return_diversity_outputs:
            if interpolate_pos_encoding is not None and not self.always_interpolates_pos_encoding:
                kwargs["interpolate_pos_encoding"] = interpolate_pos_encoding
            outputs = super().forward(pixel_values, labels=None if soft_labels else labels, **kwargs)
            if soft_labels:
                outputs.loss = soft_target_cross_entropy(outputs.logits, labels)
            return outputs

        unsupported = [k for k in ("output_attentions", "output_hidden_states") if kwargs.get(k)]
        if unsupported:
            raise ValueError(
                f"{unsupported} cannot be combined with `return_diversity_outputs=True`, which returns only the "
                "tensors the regularizers need. Run a separate forward for full attentions/hidden states."
            )
        self.install_block1_attention_capture()
        backbone, layers = self.backbone, self.diversity_layers
        # Reentrant activation checkpointing runs the forward under no_grad, which would detach the captured
        # query and key (the recompute cannot hand them back): block 1 is never checkpointed, the rest may be.
        layers[0].gradient_checkpointing = False
        sink: list[AttentionScores] = []
        first: list[torch.Tensor] = []
        last: list[torch.Tensor] = []  # the final norm's input, h^L: outside any checkpointed block, so in the graph
        first_attention, norm = attention_module(layers[0]), final_norm(backbone)
        first_attention._diverse_attention_sink = sink
        backbone.embeddings._diverse_sink = first
        norm._diverse_sink = last
        projection = backbone.embeddings.patch_embeddings.projection
        try:
            outputs = backbone(
                pixel_values.to(projection.weight.dtype), **self.backbone_kwargs(interpolate_pos_encoding)
            )
        finally:
            first_attention._diverse_attention_sink = None
            backbone.embeddings._diverse_sink = None
            norm._diverse_sink = None
        if len(sink) != 1 or len(first) != 1 or len(last) != 1:
            raise RuntimeError(
                f"{type(self).__name__}: the regularizers' inputs were not all captured once (block-1 "
                f"attention {len(sink)}, h^0 {len(first)}, h^L {len(last)}); this transformers version lays the "
                "model out differently."
            )
        return diversity_output(
            self.token_head_parts(outputs.last_hidden_state),
            labels,
            first[0],
            last[0],
            sink[0],
            token_targets,
            return_token_logits,
        )

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, push_to_hub: bool = False, **kwargs: Any):
        """Save a plain checkpoint of the stock class: safetensors weights and a `config.json` naming the stock class.

        With `push_to_hub=True` the folder is then uploaded through `push_to_hub` (same files).
        """
        hub_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "token", "commit_message", "private") if k in kwargs}
        super().save_pretrained(save_directory, *args, push_to_hub=False, **kwargs)
        if kwargs.get("is_main_process", True):
            config_path = Path(save_directory) / "config.json"
            config = json.loads(config_path.read_text(encoding="utf-8"))
            config["architectures"] = [_stock_class_name(self)]
            atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id", Path(save_directory).name)
            return self.push_to_hub(repo_id, **hub_kwargs)
        return None


class DiverseViTForImageClassification(DiverseModelMixin, ViTForImageClassification):
    """`ViTForImageClassification` that can return the Diverse-ViT regularizers' inputs. One prefix token (CLS).

    Loads any `model_type: vit` checkpoint (e.g. `facebook/deit-small-patch16-224`) and saves plain ones.
    """

    num_prefix_tokens = 1


class DiverseDeiTForImageClassification(DiverseModelMixin, DeiTForImageClassification):
    """`DeiTForImageClassification` that can return the regularizers' inputs. Two prefix tokens (CLS and
    distillation); the image is classified from CLS as in the stock class. Saves plain DeiT checkpoints."""

    num_prefix_tokens = 2


class DiverseViTMSNForImageClassification(DiverseModelMixin, ViTMSNForImageClassification):
    """`ViTMSNForImageClassification` (MSN-pretrained ViT, e.g. `facebook/vit-msn-small`) that can return the
    regularizers' inputs. One prefix token (CLS), which the head reads. Saves plain ViT-MSN checkpoints."""

    num_prefix_tokens = 1


class DiverseDinov2ForImageClassification(DiverseModelMixin, Dinov2ForImageClassification):
    """`Dinov2ForImageClassification` that can return the regularizers' inputs. One prefix token (CLS).

    The stock head is linear on `[h_CLS; mean of the patch tokens]` (final LayerNorm applied). Per-token logits are
    that head with the mean replaced by one token, `z_i = W [h_CLS; h_i] + b`; by linearity the mean of the patch
    tokens' `z_i` is exactly the image logits. DINOv2 interpolates its position embeddings for every input size.
    """

    num_prefix_tokens = 1
    always_interpolates_pos_encoding = True

    def backbone_kwargs(self, interpolate_pos_encoding: bool | None) -> dict[str, Any]:
        return {}

    def token_head_parts(self, sequence_output: torch.Tensor) -> TokenHead:
        head = linear_head(self.classifier)
        cls, patches = sequence_output[:, 0], sequence_output[:, self.num_prefix_tokens :]
        logits = head(torch.cat([cls, patches.mean(dim=1)], dim=1))
        # Split the head's weight: its CLS half and bias are a bias per sample, its token half reads each token.
        hidden = cls.shape[-1]
        cls_part = F.linear(cls, head.weight[:, :hidden], head.bias)  # (B, C)
        return TokenHead(logits, sequence_output, head.weight[:, hidden:], cls_part)


class DiverseDinov2WithRegistersForImageClassification(DiverseModelMixin, Dinov2WithRegistersForImageClassification):
    """`Dinov2WithRegistersForImageClassification` that can return the regularizers' inputs. Prefix tokens: CLS and
    `config.num_register_tokens` registers (the regularizers and the patch-wise loss skip them all). Head and
    per-token logits as in `DiverseDinov2ForImageClassification`."""

    always_interpolates_pos_encoding = True

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.config.num_register_tokens

    def backbone_kwargs(self, interpolate_pos_encoding: bool | None) -> dict[str, Any]:
        return {}

    def token_head_parts(self, sequence_output: torch.Tensor) -> TokenHead:
        return DiverseDinov2ForImageClassification.token_head_parts(self, sequence_output)


class _MeanPoolingHeadMixin:
    """BEiT-style heads: with `use_mean_pooling` the image feature is `LayerNorm(mean of the patch tokens)` (the
    backbone's own final norm is then an identity); otherwise the final-normalised CLS token, as in ViT.

    Per-token logits with mean pooling are the head applied to one token as if it were the pooled feature,
    `z_i = W LayerNorm_pool(h_i) + b`. Unlike DINOv2's, their mean is not the image logits (LayerNorm is not linear);
    the patch-wise mixing loss pairs them with each patch's own label, as it does for ViT.
    """

    def backbone_kwargs(self, interpolate_pos_encoding: bool | None) -> dict[str, Any]:
        return {"interpolate_pos_encoding": bool(interpolate_pos_encoding)}

    def token_head_parts(self, sequence_output: torch.Tensor) -> TokenHead:
        pool_norm = getattr(self.backbone.pooler, "layernorm", None)
        if pool_norm is None:  # CLS pooling
            return DiverseModelMixin.token_head_parts(self, sequence_output)
        head = linear_head(self.classifier)
        logits = head(pool_norm(sequence_output[:, self.num_prefix_tokens :].mean(dim=1)))
        return TokenHead(logits, pool_norm(sequence_output), head.weight, head.bias)


class DiverseBeitForImageClassification(_MeanPoolingHeadMixin, DiverseModelMixin, BeitForImageClassification):
    """`BeitForImageClassification` (e.g. `microsoft/beit-base-patch16-224`) that can return the regularizers'
    inputs. One prefix token (CLS); relative position bias and layer scale as in the stock class (block 1's
    captured probabilities include the bias). Head: see `_MeanPoolingHeadMixin`."""

    num_prefix_tokens = 1


class DiverseIJepaForImageClassification(DiverseModelMixin, IJepaForImageClassification):
    """`IJepaForImageClassification` that can return the regularizers' inputs. I-JEPA has no CLS token: no prefix
    tokens, and the head is linear on the mean of all (final-normalised) tokens.

    Per-token logits are the head on each token, `z_i = W h_i + b`; by linearity their mean is exactly the image
    logits. The patch-wise mixing loss uses the image logits where the other families use the CLS token's.
    """

    num_prefix_tokens = 0

    def token_head_parts(self, sequence_output: torch.Tensor) -> TokenHead:
        head = linear_head(self.classifier)
        return TokenHead(head(sequence_output.mean(dim=1)), sequence_output, head.weight, head.bias)


class DiverseTimmWrapperForImageClassification(DiverseModelMixin, TimmWrapperForImageClassification):
    """transformers' `TimmWrapperForImageClassification` around a timm ViT (e.g. `timm/deit_small_patch16_224.fb_in1k`,
    `timm/vit_base_patch16_224.augreg2_in21k_ft_in1k`, `timm/vit_small_patch14_reg4_dinov2.lvd142m`) that can return
    the regularizers' inputs. Which timm models are taken, and what is read where: `timm_vit.py`.

    Prefix tokens: timm's `num_prefix_tokens` (class token + registers). Every block keeps timm's attention kernel
    (the fused `scaled_dot_product_attention` by default); block 1's query and key are captured at the outputs of its
    `q_norm` and `k_norm` (what the kernel receives), with the block's `scale`, and its probabilities follow from them
    (`AttentionScores`). `h^0` and `h^L` come from hooks on `norm_pre` and `norm` within the one `forward_features`
    pass; the per-token logits from the model's own head (`timm_vit.timm_token_head_parts`).

    The configuration gains the attributes the package reads from every family (`image_size`, `patch_size`,
    `num_channels`, `hidden_size`, ...: `timm_vit.TIMM_CONFIG_ATTRIBUTES`), read from the built timm model; they are
    not saved. `save_pretrained` writes what the stock wrapper writes: a timm checkpoint (config.json with
    `architecture`, `pretrained_cfg`, `num_classes`, `label_names`; model.safetensors with timm's parameter names) that
    `timm.create_model("local-dir:<folder>")`, `AutoModelForImageClassification` and `pipeline("image-classification")`
    load, with `architectures: ["TimmWrapperForImageClassification"]`.
    """

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        check_timm_vision_transformer(self.timm_model, config.architecture)
        for key, value in timm_config_attributes(self.timm_model).items():
            setattr(self.config, key, value)
        if not isinstance(getattr(self.config, "pretrained_cfg", None), dict):
            # Built from a bare config: give it the preprocessing a saved timm checkpoint needs.
            self.config.pretrained_cfg = default_pretrained_cfg(self.timm_model)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.timm_model.num_prefix_tokens)

    def set_drop_path_rate(self, drop_path_rate: float) -> list[float]:
        """Stochastic depth with timm's own `DropPath` modules in the DeiT/timm schedule (rate `i / (L - 1) * r` for
        block i, `timm_vit.set_timm_drop_path_rate`): what `timm.create_model(..., drop_path_rate=r)` builds. No
        parameters are added; call again with 0 to turn it off. Returns the per-block rates."""
        return set_timm_drop_path_rate(self.timm_model, drop_path_rate)

    def install_block1_attention_capture(self) -> None:
        """Hook block 1's `q_norm` and `k_norm` (outputs: the query and key its kernel receives), `norm_pre` (output:
        `h^0`) and `norm` (input: `h^L`). Done once; the hooks write only while a diversity forward has set their
        sinks."""
        model = self.timm_model
        attention = self.diversity_layers[0].attn
        for module, hook, pre in (
            (attention.q_norm, _sink_output, False),
            (attention.k_norm, _sink_output, False),
            (embeddings_output(model), _sink_output, False),
            (final_norm(model), _sink_input, True),
        ):
            if not getattr(module, "_diverse_hooked", False):
                (module.register_forward_pre_hook if pre else module.register_forward_hook)(hook)
                module._diverse_hooked = True

    def check_pixel_values(
        self, pixel_values: torch.Tensor | None, interpolate_pos_encoding: bool | None = None
    ) -> None:
        """Raise a clear `ValueError` for images this model cannot take (timm's own asserts say less)."""
        height, width = self.check_image_batch(pixel_values)
        embed = self.timm_model.patch_embed
        if getattr(self.timm_model, "dynamic_img_size", False) or not getattr(embed, "strict_img_size", True):
            return
        expected = tuple(embed.img_size)
        if (height, width) != expected:
            raise ValueError(
                f"The model was built for {expected[0]}x{expected[1]} images but got {height}x{width}. Resize the "
                "images with the model's image processor (AutoImageProcessor: timm's evaluation transform)."
            )

    def token_head_parts(self, sequence_output: torch.Tensor) -> TokenHead:
        """See `timm_vit.timm_token_head_parts`; `sequence_output` is `forward_features`' output `norm(h^L)`."""
        return TokenHead(*timm_token_head_parts(self.timm_model, sequence_output))

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_diversity_outputs: bool = False,
        token_targets: TwoLabelTargets | None = None,
        return_token_logits: bool = True,
        **kwargs: Any,
    ) -> ImageClassifierOutput | DiverseImageClassifierOutput:
        """Classify images; optionally also return the regularizers' inputs.

        Args:
            pixel_values: `(B, C, H, W)` images, preprocessed by the checkpoint's `TimmWrapperImageProcessor`.
            labels: `(B,)` class indices or `(B, num_labels)` soft targets (soft-target cross-entropy).
            return_diversity_outputs: also return `h^0`, pre-norm `h^L`, block-1 attention probabilities and
                per-token logits (a `DiverseImageClassifierOutput`). Without it the forward is the stock wrapper's
                (`output_hidden_states` etc. as there).
            token_targets, return_token_logits: as in `DiverseModelMixin.forward`.
        """
        self.check_pixel_values(pixel_values)
        soft_labels = labels is not None and labels.is_floating_point()
        if not return_diversity_outputs:
            outputs = TimmWrapperForImageClassification.forward(
                self, pixel_values, labels=None if soft_labels else labels, **kwargs
            )
            if soft_labels and isinstance(outputs, ImageClassifierOutput):
                outputs.loss = soft_target_cross_entropy(outputs.logits, labels)
            return outputs

        unsupported = [k for k in ("output_attentions", "output_hidden_states") if kwargs.get(k)]
        if unsupported:
            raise ValueError(
                f"{unsupported} cannot be combined with `return_diversity_outputs=True`, which returns only the "
                "tensors the regularizers need. Run a separate forward for hidden states."
            )
        model = self.timm_model
        if model.grad_checkpointing and torch.is_grad_enabled() and uses_reentrant_checkpointing():
            raise ValueError(
                "timm's re-entrant activation checkpointing (TIMM_REENTRANT_CKPT=1) runs the blocks without autograd "
                "and would detach block 1's captured attention query and key from the loss. Unset TIMM_REENTRANT_CKPT "
                "(timm's default, non-reentrant checkpointing, keeps them in the graph) or turn gradient "
                "checkpointing off."
            )
        self.install_block1_attention_capture()
        queries: list[torch.Tensor] = []
        keys: list[torch.Tensor] = []
        first: list[torch.Tensor] = []
        last: list[torch.Tensor] = []
        attention, embeddings, norm = model.blocks[0].attn, embeddings_output(model), final_norm(model)
        attention.q_norm._diverse_sink, attention.k_norm._diverse_sink = queries, keys
        embeddings._diverse_sink, norm._diverse_sink = first, last
        try:
            features = model.forward_features(pixel_values.to(self.device, self.dtype))
        finally:
            attention.q_norm._diverse_sink = attention.k_norm._diverse_sink = None
            embeddings._diverse_sink = norm._diverse_sink = None
        if len(queries) != 1 or len(keys) != 1 or len(first) != 1 or len(last) != 1:
            raise RuntimeError(
                f"{type(self).__name__}: the regularizers' inputs were not all captured once (block-1 query "
                f"{len(queries)}, key {len(keys)}, h^0 {len(first)}, h^L {len(last)}); this timm version lays the "
                "model out differently."
            )
        scores = AttentionScores(queries[0], keys[0], float(attention.scale))
        return diversity_output(
            self.token_head_parts(features), labels, first[0], last[0], scores, token_targets, return_token_logits
        )

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any):
        """Save what the stock wrapper saves (a timm checkpoint, see the class), without the configuration attributes
        this class adds (`timm_vit.TIMM_CONFIG_ATTRIBUTES`)."""
        if getattr(self, "_weight_conversions", None) is None:
            # Built from a config rather than loaded: transformers would keep the wrapper's `timm_model.` prefix (it
            # reverts only the conversions a load used); save timm's names all the same.
            from transformers import conversion_mapping

            self._weight_conversions = conversion_mapping.get_checkpoint_conversion_mapping("timm_wrapper") or None
        added = {key: self.config.__dict__.pop(key) for key in TIMM_CONFIG_ATTRIBUTES if key in self.config.__dict__}
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            for key, value in added.items():
                setattr(self.config, key, value)


def _register_timm_weight_names(model_class: type[PreTrainedModel]) -> None:
    """Give `model_class` transformers' `timm_wrapper` weight-name conversion (a timm checkpoint's `blocks.0...` <->
    the wrapper's `timm_model.blocks.0...`, applied when loading and reverted when saving). transformers applies it by
    `model_type` to its own classes only: since 5.2x it skips classes defined elsewhere unless they are registered,
    and ours would then save `timm_model.`-prefixed weights that timm cannot load. Registered by class name."""
    from transformers import conversion_mapping

    register = getattr(conversion_mapping, "register_checkpoint_conversion_mapping", None)
    mapping = conversion_mapping.get_checkpoint_conversion_mapping("timm_wrapper")
    if register is not None and mapping:
        register(model_class.__name__, mapping, overwrite=True)


_register_timm_weight_names(DiverseTimmWrapperForImageClassification)


DIVERSE_MODEL_CLASSES: dict[str, type[DiverseModelMixin]] = {
    "vit": DiverseViTForImageClassification,
    "deit": DiverseDeiTForImageClassification,
    "vit_msn": DiverseViTMSNForImageClassification,
    "dinov2": DiverseDinov2ForImageClassification,
    "dinov2_with_registers": DiverseDinov2WithRegistersForImageClassification,
    "beit": DiverseBeitForImageClassification,
    "ijepa": DiverseIJepaForImageClassification,
    "timm_wrapper": DiverseTimmWrapperForImageClassification,
}
SUPPORTED_MODEL_TYPES = tuple(DIVERSE_MODEL_CLASSES)
# Families whose transformers classes cannot give the block-1 contract, and why (the error says so).
UNSUPPORTED_MODEL_TYPES = {
    "data2vec-vision": "transformers' Data2VecVision still picks its attention class at construction and does not "
    "call the `ALL_ATTENTION_FUNCTIONS` interface, so block 1's query and key cannot be captured",
    "swin": "Swin attends within shifted local windows over hierarchical (merged) tokens: there is no global patch "
    "sequence or N x N attention map for the patch and attention terms to be defined on",
}


def diverse_model_class_for_config(config: PretrainedConfig) -> type[DiverseModelMixin]:
    """The diverse classifier class for a config's `model_type`; a clear error naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in DIVERSE_MODEL_CLASSES:
        reason = UNSUPPORTED_MODEL_TYPES.get(model_type)
        raise ValueError(
            f"This checkpoint has model_type {model_type!r}, which Diverse-ViT does not support"
            + (f": {reason}." if reason else ".")
            + f" Supported model types: {', '.join(SUPPORTED_MODEL_TYPES)} (e.g. facebook/deit-small-patch16-224, "
            "facebook/dinov2-small-imagenet1k-1-layer, microsoft/beit-base-patch16-224, and timm's ViTs such as "
            "timm/deit_small_patch16_224.fb_in1k)."
        )
    return DIVERSE_MODEL_CLASSES[model_type]


def load_diverse_model(name_or_path: str, allow_pickle: bool = False, **kwargs: Any) -> DiverseModelMixin:
    """`from_pretrained` of the diverse class for a checkpoint's `model_type` (Hub id or local folder).

    Keyword arguments go to both `AutoConfig.from_pretrained` (config overrides such as `num_labels`,
    `id2label`) and `from_pretrained` (e.g. `ignore_mismatched_sizes`, `dtype`).

    Only safetensors weights are read unless `allow_pickle=True`: pickle files (`pytorch_model.bin`) can run code
    when loaded, so a checkpoint holding only those is refused with an `OSError` saying how to opt in.
    """
    if not allow_pickle:
        if kwargs.get("use_safetensors") is False:
            raise ValueError("use_safetensors=False reads pickle weights: pass allow_pickle=True to allow that.")
        kwargs["use_safetensors"] = True
    config_keys = {"revision", "token", "cache_dir", "local_files_only"}
    config = AutoConfig.from_pretrained(name_or_path, **{k: v for k, v in kwargs.items() if k in config_keys})
    model_class = diverse_model_class_for_config(config)
    try:
        return model_class.from_pretrained(name_or_path, **kwargs)
    except OSError as error:
        if allow_pickle or "safetensors" not in str(error):
            raise
        raise OSError(
            f"{name_or_path!r} has no safetensors weights (model.safetensors); its weights are pickle files "
            "(pytorch_model.bin), which can run arbitrary code when loaded and are refused by default. If you trust "
            "the source, pass allow_pickle=True (--allow_pickle in examples/run_diverse.py), e.g. once, to re-save it "
            f"with save_pretrained as safetensors. ({error})"
        ) from error


__all__ = [
    "BLOCK1_CAPTURE_PREFIX",
    "DIVERSE_MODEL_CLASSES",
    "SUPPORTED_MODEL_TYPES",
    "UNSUPPORTED_MODEL_TYPES",
    "AttentionScores",
    "BranchDropout",
    "DiverseBeitForImageClassification",
    "DiverseDeiTForImageClassification",
    "DiverseDinov2ForImageClassification",
    "DiverseDinov2WithRegistersForImageClassification",
    "DiverseIJepaForImageClassification",
    "DiverseImageClassifierOutput",
    "DiverseTimmWrapperForImageClassification",
    "DiverseModelMixin",
    "DiverseViTForImageClassification",
    "DiverseViTMSNForImageClassification",
    "TokenHead",
    "diverse_model_class_for_config",
    "eager_attention_with_probs",
    "linear_head",
    "load_diverse_model",
    "register_block1_capture_attention",
]
