"""RETRO-pytorch (0.3.9) state dict <-> retro_dist state dict, exact in both directions.

RETRO-pytorch keeps separate q/k/v projections, positional ModuleLists (`layers.N.{0,1,2}`) and RMSNorm `gamma`;
retro_dist fuses q/k/v (self-attention) and k/v (cross-attention), names its sublayers, and calls the RMSNorm
scale `weight` and its gate `gate`. Tensors are concatenated or split, never changed.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import Tensor

from retro_dist.model.config import RetroConfig

RP_HEADS = 8  # RETRO-pytorch never passes `heads` to its encoder and decoder: they always run 8 heads
_SUBLAYER = {"0": "self_attn", "1": "cross_attn", "2": "ff"}
_SUBLAYER_RP = {v: k for k, v in _SUBLAYER.items()}
_ROTARY_INV_FREQ = 1.0 / (10000 ** (torch.arange(0, 32, 2).float() / 32))


def _norm_names(config: RetroConfig) -> dict[str, str]:
    """RETRO-pytorch norm parameter name -> ours."""
    if config.gated_rmsnorm:
        return {"gamma": "weight", "weight": "gate"}
    if config.use_deepnet:
        return {"weight": "weight", "bias": "bias"}  # nn.LayerNorm in both
    return {"gamma": "weight"}


def from_retro_pytorch(state: dict[str, Tensor], config: RetroConfig) -> dict[str, Tensor]:
    """RETRO-pytorch `RETRO.state_dict()` -> a state dict for `retro_dist.RETRO(config)`; `config` must run
    RETRO-pytorch's positions (`config_from_retro_pytorch(kwargs)` or `infer_config(state)` gives it)."""
    if config.cca_positions != "retro-pytorch":
        raise ValueError(f"the config uses cca_positions={config.cca_positions!r}, but RETRO-pytorch's weights were "
                         f"trained with its own shifted positions and would give other logits: build the config with "
                         f"retro_dist.convert.config_from_retro_pytorch(kwargs) (or infer_config(state_dict))")
    norms = _norm_names(config)
    out: dict[str, Tensor] = {}
    pending: dict[str, dict[str, Tensor]] = {}  # fused projections waiting for their parts
    for key, value in state.items():
        if key.endswith("rotary_pos_emb.inv_freq"):
            continue  # a constant; ours is a non-persistent buffer
        m = re.fullmatch(r"(encoder|decoder)\.layers\.(\d+)\.([012])\.(.+)", key)
        if m is None:
            m2 = re.fullmatch(r"(encoder|decoder)\.norm_out\.(\w+)", key)
            if m2:
                out[f"{m2[1]}.norm_out.{norms[m2[2]]}"] = value
            else:
                out[key] = value  # embeddings, to_decoder_model_dim, encoder.project_out, to_logits
            continue
        stack, layer, sub, rest = m[1], m[2], _SUBLAYER[m[3]], m[4]
        prefix = f"{stack}.blocks.{layer}.{sub}"
        if rest.startswith("norm."):
            out[f"{prefix}.norm.{norms[rest[5:]]}"] = value
            continue
        rest = rest[3:]  # drop "fn."
        attn = prefix + (".fn.attn" if stack == "decoder" and sub == "cross_attn" else ".fn")
        rest = rest.removeprefix("cross_attn.")
        part = re.fullmatch(r"(to_q|to_k|to_v|null_k|null_v)(\.weight)?", rest)
        if part is None:
            out[f"{attn}.{rest}"] = value  # to_out.*, ff.*
        else:
            pending.setdefault(attn, {})[part[1]] = value
    for attn, parts in pending.items():
        if ".self_attn." in attn + ".":
            out[f"{attn}.to_qkv.weight"] = torch.cat([parts["to_q"], parts["to_k"], parts["to_v"]], dim=0)
        else:
            out[f"{attn}.to_q.weight"] = parts["to_q"]
            out[f"{attn}.to_kv.weight"] = torch.cat([parts["to_k"], parts["to_v"]], dim=0)
            if "null_k" in parts:
                out[f"{attn}.null_kv"] = torch.stack([parts["null_k"], parts["null_v"]], dim=0)
    return out


def to_retro_pytorch(state: dict[str, Tensor], config: RetroConfig) -> dict[str, Tensor]:
    """A retro_dist state dict -> RETRO-pytorch `RETRO.state_dict()` (with its rotary buffers)."""
    if config.heads != RP_HEADS:
        raise ValueError(f"RETRO-pytorch always runs {RP_HEADS} heads; a model with heads={config.heads} "
                         f"cannot be expressed there")
    if config.cca_positions != "retro-pytorch":
        raise ValueError(f"the model uses cca_positions={config.cca_positions!r}; RETRO-pytorch always runs its own "
                         f"shifted positions, so its logits would differ: only models with "
                         f"cca_positions='retro-pytorch' convert to it")
    norms = {ours: theirs for theirs, ours in _norm_names(config).items()}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        m = re.fullmatch(r"(encoder|decoder)\.blocks\.(\d+)\.(self_attn|cross_attn|ff)\.(.+)", key)
        if m is None:
            m2 = re.fullmatch(r"(encoder|decoder)\.norm_out\.(\w+)", key)
            out[f"{m2[1]}.norm_out.{norms[m2[2]]}" if m2 else key] = value
            continue
        stack, layer, sub, rest = m[1], m[2], m[3], m[4]
        prefix = f"{stack}.layers.{layer}.{_SUBLAYER_RP[sub]}"
        if rest.startswith("norm."):
            out[f"{prefix}.norm.{norms[rest[5:]]}"] = value
            continue
        fn = f"{prefix}.fn.cross_attn" if stack == "decoder" and sub == "cross_attn" else f"{prefix}.fn"
        rest = rest[3:].removeprefix("attn.")  # drop "fn." and the decoder's "attn."
        if rest == "to_qkv.weight":
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                out[f"{fn}.{name}.weight"] = part.clone()
        elif rest == "to_kv.weight":
            for name, part in zip(("to_k", "to_v"), value.chunk(2, dim=0)):
                out[f"{fn}.{name}.weight"] = part.clone()
        elif rest == "null_kv":
            out[f"{fn}.null_k"], out[f"{fn}.null_v"] = value[0].clone(), value[1].clone()
        else:
            out[f"{fn}.{rest}"] = value
    for stack in ("encoder", "decoder"):
        out[f"{stack}.rotary_pos_emb.inv_freq"] = _ROTARY_INV_FREQ.clone()
    return out


def retro_pytorch_kwargs(config: RetroConfig) -> dict[str, Any]:
    """The `retro_pytorch.RETRO(**kwargs)` that builds the same model (cca_positions is ours alone)."""
    kwargs = config.to_dict()
    del kwargs["cca_positions"]
    return kwargs


def config_from_retro_pytorch(kwargs: dict[str, Any]) -> RetroConfig:
    """RetroConfig for a model built as `retro_pytorch.RETRO(**kwargs)`; heads becomes 8, as it really ran."""
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()}
    if kwargs.pop("norm_klass", None) is not None:
        raise ValueError("norm_klass is not supported: retro_dist offers RMSNorm, gated RMSNorm and deepnet LayerNorm")
    if kwargs.get("heads", RP_HEADS) != RP_HEADS:
        warnings.warn(f"RETRO-pytorch ignores heads={kwargs['heads']} and runs {RP_HEADS} heads; "
                      f"the converted config says heads={RP_HEADS}", stacklevel=2)
    kwargs["heads"] = RP_HEADS
    kwargs["cca_positions"] = "retro-pytorch"  # what its weights were trained with
    defaults = RetroConfig()
    for stack in ("enc", "dec"):
        # RETRO-pytorch silently drops cross-attention layers past the depth; keep the ones that exist
        layers, depth = kwargs.get(f"{stack}_cross_attn_layers"), kwargs.get(f"{stack}_depth", getattr(defaults, f"{stack}_depth"))
        if layers is not None:
            kwargs[f"{stack}_cross_attn_layers"] = tuple(v for v in layers if 1 <= v <= depth)
    return RetroConfig.from_dict(kwargs)


def infer_config(state: dict[str, Tensor], **overrides: Any) -> RetroConfig:
    """Read a RETRO-pytorch state dict's shapes back into a RetroConfig (chunk_size, pad_id, dropouts and custom
    residual scales are not in the weights: pass them as overrides)."""
    num_tokens, enc_dim = state["token_emb.weight"].shape
    stacks = {"enc": "encoder", "dec": "decoder"}
    layers = {s: sorted({int(m[1]) for k in state if (m := re.match(rf"{name}\.layers\.(\d+)\.", k))})
              for s, name in stacks.items()}
    norm = "decoder.layers.0.0.norm."
    found: dict[str, Any] = dict(
        num_tokens=num_tokens, enc_dim=enc_dim, max_seq_len=state["pos_emb.weight"].shape[0],
        dec_dim=state["to_logits.weight"].shape[1], enc_depth=len(layers["enc"]), dec_depth=len(layers["dec"]),
        dim_head=state["decoder.layers.0.0.fn.to_q.weight"].shape[0] // RP_HEADS, heads=RP_HEADS,
        gated_rmsnorm=norm + "gamma" in state and norm + "weight" in state,
        use_deepnet=not any(k.startswith("decoder.norm_out.") for k in state),  # post-norm has no final norm
    )
    for s, name in stacks.items():
        cross = tuple(i + 1 for i in layers[s] if any(k.startswith(f"{name}.layers.{i}.1.") for k in state))
        found[f"{s}_cross_attn_layers"] = None if len(cross) == len(layers[s]) else cross
    found["cca_positions"] = "retro-pytorch"
    found.update(overrides)
    return RetroConfig(**found)
