"""What the U-Net is conditioned on: the text encoder's token states (SD 1.x/2.x: a tensor [B, 77, D]), or
for SDXL an `AddedCond`, the token states plus the pooled text embedding and the six micro-conditioning
numbers (Podell et al. 2023, sec. 2.2) that SDXL adds to its time embedding.

Guidance, the runners and the CUDA graphs treat both alike through the helpers here: a batch of contexts
has a length, is sliced and concatenated, and becomes the U-Net's keyword arguments."""

from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class AddedCond:
    hidden: torch.Tensor  # [B, 77, 2048]: CLIP ViT-L and OpenCLIP bigG penultimate states, concatenated
    text_embeds: torch.Tensor  # [B, 1280]: bigG's pooled, projected embedding
    time_ids: torch.Tensor  # [B, 6]: original size (h, w), crop top-left (top, left), target size (h, w)

    def __len__(self) -> int:
        return len(self.hidden)

    def __getitem__(self, index) -> "AddedCond":
        return AddedCond(*(getattr(self, f.name)[index] for f in fields(self)))

    def parts(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))


Context = torch.Tensor | AddedCond


def cat(contexts: list[Context]) -> Context:
    if isinstance(contexts[0], AddedCond):
        return AddedCond(*(torch.cat(group) for group in zip(*(c.parts() for c in contexts))))
    return torch.cat(contexts)


def unet_kwargs(context: Context) -> dict:
    if isinstance(context, AddedCond):
        return {"encoder_hidden_states": context.hidden,
                "added_cond_kwargs": {"text_embeds": context.text_embeds, "time_ids": context.time_ids}}
    return {"encoder_hidden_states": context}


def parts(context: Context) -> tuple[torch.Tensor, ...]:
    """The tensors of a context, for CUDA-graph keys and static copies."""
    return context.parts() if isinstance(context, AddedCond) else (context,)


def rebuild(like: Context, tensors: tuple[torch.Tensor, ...]) -> Context:
    return AddedCond(*tensors) if isinstance(like, AddedCond) else tensors[0]
