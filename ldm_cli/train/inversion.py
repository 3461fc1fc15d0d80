"""Textual inversion (Gal et al. 2022): learn the input embedding of a new token, everything else frozen.

The token (and `TOKEN_1` ... `TOKEN_{N-1}` for N vectors, diffusers' multi-vector naming, which
`models/embeddings.expand` writes out in prompts) is added to the tokenizer, and the text encoder's
token embedding is wrapped so that those ids read N trainable vectors instead of the frozen table:
the optimizer, checkpoints and the gradient see only the [N, D] vectors, never the 49k-row table.
Initial vectors: the init text's token embeddings, cycled over the N vectors (as A1111 does).

The result is written as `{TOKEN: [N, D]}` in TOKEN.safetensors, which diffusers'
`load_textual_inversion` (a one-key file names its token) and A1111 (a one-tensor file named by the
file) both read, as does `ldm sample --embedding`. SDXL: the token goes into both encoders, each with its
own vectors, written as `{clip_l, clip_g}` (the SDXL embedding format A1111 and ldm read; diffusers loads
it with two load_textual_inversion calls).
"""

from pathlib import Path

import torch
from torch import nn

from ldm_cli.errors import check


class WithNewTokens(nn.Module):
    """A token embedding table whose ids [first, first + N) read `vectors` [N, D] (trained) instead."""

    def __init__(self, base: nn.Embedding, first: int, vectors: torch.Tensor):
        super().__init__()
        self.base, self.first = base, first
        self.vectors = nn.Parameter(vectors.clone())

    @property
    def weight(self) -> torch.Tensor:  # what code reading the table directly sees (the frozen rows)
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = len(self.vectors)
        new = (ids >= self.first) & (ids < self.first + n)
        old = self.base(torch.where(new, 0, ids))
        picked = self.vectors[(ids - self.first).clamp(0, n - 1)].to(old.dtype)
        return torch.where(new[..., None], picked, old)


def token_names(token: str, vectors: int) -> list[str]:
    return [token] + [f"{token}_{i}" for i in range(1, vectors)]


def add_token(c, token: str, init_word: str, vectors: int) -> list[nn.Parameter]:
    """Add `token` (N = `vectors` tokens) to each of c's tokenizer/text encoder pairs (SDXL: both), in place;
    returns the trainable [N, D] vectors of each, initialised from `init_word`'s embeddings there."""
    check(c.family != "sdxl-refiner", "--textual-inversion: an SDXL refiner has no CLIP-L encoder; train on the base")
    pairs = [(c.tokenizer, c.text_encoder)] + ([(c.tokenizer_2, c.text_encoder_2)] if c.family == "sdxl" else [])
    return [_add_to(tokenizer, encoder, token, init_word, vectors) for tokenizer, encoder in pairs]


def _add_to(tokenizer, encoder, token: str, init_word: str, vectors: int) -> nn.Parameter:
    vocab = tokenizer.get_vocab()
    names = token_names(token, vectors)
    taken = [n for n in names if n in vocab or f"{n}</w>" in vocab]
    check(not taken, f"--textual-inversion {token}: {(taken or [''])[0]!r} is already a word of this tokenizer; choose a "
          "made-up token (e.g. 'sks-dog')")
    init_ids = tokenizer(init_word, add_special_tokens=False).input_ids
    check(init_ids != [], f"--init-word {init_word!r}: gives no tokens; name a word close to the concept")
    base = encoder.get_input_embeddings()
    init = base.weight.detach()[torch.tensor(init_ids)[torch.arange(vectors) % len(init_ids)]].float()
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    check(ids == list(range(ids[0], ids[0] + vectors)), f"--textual-inversion {token}: the tokenizer gave ids "
          f"{ids}; expected {vectors} consecutive new ids")
    encoder.set_input_embeddings(WithNewTokens(base, ids[0], init))
    encoder.requires_grad_(False)
    table = encoder.get_input_embeddings()
    table.vectors.requires_grad_(True)
    return table.vectors


class PairEncoder(nn.Module):
    """SDXL's two text encoders as one module (what trains, and what DDP wraps): token ids of each ->
    (penultimate states of both, concatenated [B, 77, D1 + D2], the second's pooled projection [B, P]), as
    models/codecs.encode_text_sdxl computes them for plain text."""

    def __init__(self, first, second):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, ids_1: torch.Tensor, ids_2: torch.Tensor):
        one = self.first(ids_1, output_hidden_states=True)
        two = self.second(ids_2, output_hidden_states=True)
        return torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1), two[0]


def tokens_in(caption: str, token: str) -> bool:
    return token in caption.replace(",", " ").split()


def save_embedding(vectors: list[torch.Tensor], token: str, path: Path) -> None:
    """{token: [N, D]} (SD), or SDXL's {clip_l: [N, 768], clip_g: [N, 1280]}, as safetensors, fp32: what
    diffusers, A1111 and `--embedding` read."""
    from safetensors.torch import save_file

    names = [token] if len(vectors) == 1 else ["clip_l", "clip_g"]
    save_file({n: v.detach().float().cpu().contiguous() for n, v in zip(names, vectors)}, str(path))
