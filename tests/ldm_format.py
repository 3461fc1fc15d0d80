"""Write a diffusers model as an original-layout (CompVis LDM) single-file checkpoint, for tests.

Our own key mapping, derived from the LDM layout: the U-Net's `input_blocks`/`output_blocks` are
numbered (layers_per_block + 1) per level; the VAE decoder's levels count upwards. The tests check
the mapping by loading the file back through diffusers' from_single_file and comparing outputs.
"""

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


def write_ldm_checkpoint(pipe, path) -> None:
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
    for k, v in pipe.text_encoder.state_dict().items():  # transformers >= 5.6 drops the text_model prefix
        sd["cond_stage_model.transformer.text_model." + k.removeprefix("text_model.")] = v
    save_file({k: t.contiguous() for k, t in sd.items()}, str(path))
