"""Textual inversion (Gal et al. 2022): learn the input embedding of a new token, everything else frozen.

The token (and `TOKEN_1` ... `TOKEN_{N-1}` for N vectors, diffusers' multi-vector naming, which
`models/embeddings.expand` writes out in prompts) is added to the tokenizer, and the text encoder's
token embedding is wrapped so that those ids read N trainable vectors instead of the frozen table:
the optimizer, checkpoints and the gradient see only the [N, D] vectors, never the 49k-row table.
Initial vectors: the init text's token embeddings, cycled over the N vectors (as A1111 does).

The result is written as `{TOKEN: [N, D]}` in TOKEN.safetensors, which diffusers'
`load_textual_inversion` (a one-key file names its token) and A1111 (a one-tensor file named by the
file) both read, as does `ldm sample --embedding`.
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


def add_token(c, token: str, init_word: str, vectors: int) -> nn.Parameter:
    """Add `token` (N = `vectors` tokens) to c's tokenizer and text encoder, in place; returns the
    trainable [N, D] vectors, initialised from `init_word`'s embeddings."""
    check(c.family == "sd", "--textual-inversion: SDXL (two text encoders) is not supported yet; train a LoRA")
    tokenizer, encoder = c.tokenizer, c.text_encoder
    check(token and not any(ch in token for ch in ' ,:/\\<>"|?*()[]'), f"--textual-inversion {token!r}: a token is "
          "one word of letters, digits, '-' or '_' (it names the file too), e.g. 'sks-dog'")
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


def tokens_in(caption: str, token: str) -> bool:
    return token in caption.replace(",", " ").split()


def save_embedding(vectors: torch.Tensor, token: str, path: Path) -> None:
    """{token: [N, D]} as safetensors, fp32 (what diffusers, A1111 and `--embedding` read)."""
    from safetensors.torch import save_file

    save_file({token: vectors.detach().float().cpu().contiguous()}, str(path))
