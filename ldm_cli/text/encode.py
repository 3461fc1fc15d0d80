"""Prompts -> CLIP token states the way AUTOMATIC1111 makes them: emphasis weights, prompts of any length
in chunks of 75 tokens, BREAK, clip skip.

A prompt's weighted runs (text/attention.py) are tokenized and laid out in chunks of 75 tokens; a chunk
that would split mid-phrase moves back to just after the last comma within 20 tokens; BREAK starts a
new chunk. Each chunk is [BOS] + 75 tokens + [EOS], padded as the tokenizer pads (EOS for SD 1.x, the
pad token for SD 2.x), and encoded on its own; the states of the chunks are concatenated (77 x k tokens).
Weights multiply each token's state, and the mean of the chunk's states is restored (A1111's "Original"
emphasis), per prompt, so a prompt's conditioning does not depend on the batch it is in.
Clip skip N takes the states N layers from the end (1 = the last layer), through the final layer norm.
A prompt without emphasis, BREAK or more than 75 tokens gives exactly the plain tokenizer's conditioning.
"""

import torch

from ldm_cli.errors import check
from ldm_cli.text.attention import BREAK, parse

CHUNK = 75  # tokens per chunk between BOS and EOS for CLIP's 77 positions (the tokenizer's limit - 2 in general)
COMMA_BACKTRACK = 20  # A1111's default "comma padding backtrack"


def chunks(tokenizer, prompt: str) -> list[tuple[list[int], list[float]]]:
    """The prompt's chunks: (77 token ids, 77 weights) each (the tokenizer's max length, in general)."""
    size = min(CHUNK, tokenizer.model_max_length - 2)
    comma = tokenizer.get_vocab().get(",</w>", -1)
    out: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close():
        nonlocal tokens, weights, last_comma
        pad = size - len(tokens)
        ids = [tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id, *[tokenizer.pad_token_id] * pad]
        out.append((ids, [1.0, *weights, 1.0, *[1.0] * pad]))
        tokens, weights, last_comma = [], [], -1

    for text, weight in parse(prompt):
        if (text, weight) == BREAK:
            close()
            continue
        for token in tokenizer(text, add_special_tokens=False).input_ids:
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == size and last_comma != -1 and len(tokens) - last_comma <= COMMA_BACKTRACK:
                moved = tokens[last_comma + 1:], weights[last_comma + 1:]  # the phrase after the comma
                tokens, weights = tokens[:last_comma + 1], weights[:last_comma + 1]
                close()
                tokens, weights = list(moved[0]), list(moved[1])
            if len(tokens) == size:
                close()
            tokens.append(token)
            weights.append(weight)
    if tokens or not out:
        close()
    return out


def states(encoder, ids: torch.Tensor, clip_skip: int = 1, mask=None) -> torch.Tensor:
    """Token states [B, 77, D] of one chunk per row, clip_skip layers from the end."""
    if clip_skip <= 1:
        return encoder(ids, attention_mask=mask)[0]
    out = encoder(ids, attention_mask=mask, output_hidden_states=True)
    final_norm = getattr(encoder, "text_model", encoder).final_layer_norm  # transformers 4 / 5 layouts
    return final_norm(out.hidden_states[-clip_skip])


def weighted(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each token's state times its weight, then the chunk's mean restored (A1111's "Original")."""
    original = z.mean()
    z = z * weights.to(z.dtype).unsqueeze(-1)
    return z * (original / z.mean())


def encode(tokenizer, encoder, prompt: str, device, clip_skip: int = 1, use_mask: bool = False) -> torch.Tensor:
    """One prompt's conditioning [1, 77 k, D]."""
    out = []
    for ids, weights in chunks(tokenizer, prompt):
        ids_t = torch.tensor([ids], device=device)
        real = ids.index(tokenizer.eos_token_id) + 1  # BOS, the tokens and EOS; the rest is padding
        mask = torch.tensor([[1] * real + [0] * (len(ids) - real)], device=device) if use_mask else None
        z = states(encoder, ids_t, clip_skip, mask)
        out.append(z if all(w == 1.0 for w in weights) else weighted(z, torch.tensor([weights], device=device)))
    return torch.cat(out, dim=1)


def pad_to(z: torch.Tensor, length: int, empty: torch.Tensor) -> torch.Tensor:
    """z [B, 77 k, D] extended to `length` tokens with the empty prompt's chunk [1, 77, D], as A1111 pads
    the shorter of prompt and negative prompt."""
    missing = (length - z.shape[1]) // empty.shape[1]
    return torch.cat([z, empty.expand(len(z), -1, -1).repeat(1, missing, 1)], dim=1) if missing else z


def encode_sdxl(pairs, prompt: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's conditioning of one prompt the A1111 way: per text encoder, each chunk's penultimate states
    (no final norm, as SDXL was trained), weighted with its mean restored; the encoders' states
    concatenated on the feature axis ([1, 77 k, 768 + 1280]); the pooled embedding from the first chunk,
    unweighted (A1111). `pairs`: (tokenizer, encoder) for each encoder present (the refiner has one)."""
    states_per_encoder, pooled = [], None
    for tokenizer, encoder in pairs:
        zs = []
        for k, (ids, weights) in enumerate(chunks(tokenizer, prompt)):
            out = encoder(torch.tensor([ids], device=device), output_hidden_states=True)
            if k == 0 and out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds first
                pooled = out[0]
            z = out.hidden_states[-2]
            zs.append(z if all(w == 1.0 for w in weights) else weighted(z, torch.tensor([weights], device=device)))
        states_per_encoder.append(torch.cat(zs, dim=1))
    check(len({z.shape[1] for z in states_per_encoder}) == 1, "the two SDXL tokenizers chunk this prompt differently")
    return torch.cat(states_per_encoder, dim=-1), pooled
