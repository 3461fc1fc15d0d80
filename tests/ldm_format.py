"""Write a diffusers model as an original-layout (CompVis LDM) single-file checkpoint, for tests.

Our own key mapping, derived from the LDM layout: the U-Net's `input_blocks`/`output_blocks` are
numbered (layers_per_block + 1) per level; the VAE decoder's levels count upwards. The tests check
the mapping by loading the file back through diffusers' from_single_file and comparing outputs.
"""

import torch
from safetensors.torch import save_file

RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
          ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
VAE_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _rename(rest: str, pairs) -> str:
    head, _, param = rest.rpartition(".")
    for a, b in pairs:
        if head == a:
            return f"{b}.{param}"
    return rest


def unet_key(k: str, layers: int, up_has_attn: list[bool]) -> str:
    p = k.split(".")
    n = layers + 1
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",  # SDXL
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    head = ".".join(p[:-1])
    if head in fixed:
        return f"{fixed[head]}.{p[-1]}"
    if p[0] in ("down_blocks", "up_blocks"):
        i, kind, down = int(p[1]), p[2], p[0] == "down_blocks"
        if kind == "downsamplers":
            return f"input_blocks.{(i + 1) * n}.0.op." + ".".join(p[5:])
        if kind == "upsamplers":
            return f"output_blocks.{i * n + layers}.{2 if up_has_attn[i] else 1}." + ".".join(p[4:])
        j, rest = int(p[3]), ".".join(p[4:])
        block = f"input_blocks.{i * n + j + 1}" if down else f"output_blocks.{i * n + j}"
        return f"{block}.0.{_rename(rest, RESNET)}" if kind == "resnets" else f"{block}.1.{rest}"
    if p[0] == "mid_block":
        j, rest = int(p[2]), ".".join(p[3:])
        if p[1] == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * j}.{_rename(rest, RESNET)}"
    raise KeyError(k)


def vae_key(k: str, levels: int) -> str:
    p = k.split(".")
    side = p[0]
    if p[1] in ("down_blocks", "up_blocks"):
        i = int(p[2]) if side == "encoder" else levels - 1 - int(p[2])
        where = "down" if side == "encoder" else "up"
        if p[3] in ("downsamplers", "upsamplers"):
            return f"{side}.{where}.{i}.{'downsample' if side == 'encoder' else 'upsample'}." + ".".join(p[5:])
        rest = ".".join(p[5:]).replace("conv_shortcut", "nin_shortcut")
        return f"{side}.{where}.{i}.block.{p[4]}.{rest}"
    if p[1] == "mid_block":
        rest = ".".join(p[4:])
        if p[2] == "attentions":
            return f"{side}.mid.attn_1.{_rename(rest, VAE_ATTN)}"
        return f"{side}.mid.block_{int(p[3]) + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
    return k.replace("conv_norm_out", "norm_out")


def _unet_and_vae(pipe) -> dict:
    unet, vae = pipe.unet, pipe.vae
    up_has_attn = ["CrossAttn" in t for t in unet.config.up_block_types]
    sd = {}
    for k, v in unet.state_dict().items():
        sd["model.diffusion_model." + unet_key(k, unet.config.layers_per_block, up_has_attn)] = v
    for k, v in vae.state_dict().items():
        new = vae_key(k, len(vae.config.block_out_channels))
        if ".mid.attn_1." in new and new.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]  # LDM's VAE attention uses 1x1 convs, diffusers uses linears
        sd["first_stage_model." + new] = v
    return sd


def _clip(encoder, prefix: str) -> dict:
    # transformers >= 5.6 drops the text_model prefix
    return {prefix + "text_model." + k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}


def write_ldm_checkpoint(pipe, path) -> None:
    sd = _unet_and_vae(pipe) | _clip(pipe.text_encoder, "cond_stage_model.transformer.")
    save_file({k: t.contiguous() for k, t in sd.items()}, str(path))


OPEN_CLIP = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
             ("self_attn.out_proj", "attn.out_proj")]


def open_clip(encoder, prefix: str) -> dict:
    """A CLIPTextModelWithProjection in OpenCLIP's layout (SGM's `conditioner.embedders.1.model.`): q, k, v
    stacked into in_proj, the projection as a matrix x @ P (so P = W^T of the Linear)."""
    sd = {k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}
    out = {prefix + "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           prefix + "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           prefix + "ln_final.weight": sd.pop("final_layer_norm.weight"),
           prefix + "ln_final.bias": sd.pop("final_layer_norm.bias"),
           prefix + "text_projection": sd.pop("text_projection.weight").T}
    sd.pop("embeddings.position_ids", None)
    layers = {int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")}
    for i in sorted(layers):
        a, b = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{b}attn.in_proj_{kind}"] = torch.cat([sd.pop(f"{a}self_attn.{m}_proj.{kind}") for m in "qkv"])
            for ours, theirs in OPEN_CLIP:
                out[f"{b}{theirs}.{kind}"] = sd.pop(f"{a}{ours}.{kind}")
    assert not sd, sorted(sd)  # every tensor placed
    return out


def write_sgm_checkpoint(pipe, path) -> None:
    """An SDXL base pipeline as Stability's single file (generative-models layout): the U-Net and VAE as in
    LDM, CLIP ViT-L under conditioner.embedders.0.transformer, OpenCLIP bigG under conditioner.embedders.1.model."""
    sd = (_unet_and_vae(pipe) | _clip(pipe.text_encoder, "conditioner.embedders.0.transformer.")
          | open_clip(pipe.text_encoder_2, "conditioner.embedders.1.model."))
    save_file({k: t.contiguous() for k, t in sd.items()}, str(path))
