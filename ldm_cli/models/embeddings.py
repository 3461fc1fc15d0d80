"""Textual-inversion embeddings (Gal et al. 2022): new token rows in the text encoder, named by a token.

`--embedding FILE[:TOKEN]` loads a file through diffusers' own loader (`load_textual_inversion`: the
diffusers format, a single-key file, A1111's `string_to_param` .pt and `emb_params` .safetensors; for
SDXL the clip_l/clip_g pair, one half per text encoder), which
adds the token (and `TOKEN_1`, ... for a multi-vector embedding) to the tokenizer and the rows to the
text encoder, in place at load time, as LoRA fusing is. `expand` writes a multi-vector token out in a
prompt as diffusers' pipelines do ("tok" -> "tok tok_1 tok_2").
"""

from pathlib import Path

from ldm_cli.errors import LdmError, check
from ldm_cli.models import runs

PICKLE = (".pt", ".bin", ".ckpt", ".pth")


def parse_spec(spec: str) -> tuple[Path, str | None]:
    """'FILE:TOKEN' -> (FILE, TOKEN) when TOKEN holds no path separator; 'FILE' -> (FILE, None)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and tail and "/" not in tail and "\\" not in tail:
        return Path(head), tail
    return Path(spec), None


def default_token(path: Path) -> str:
    """A diffusers-format file names its token (its one key); A1111's files (emb_params, string_to_param)
    are named by the file."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
        except Exception as e:  # noqa: BLE001 (a damaged file: safetensors' own error types)
            raise LdmError(f"--embedding {path}: not a valid .safetensors file ({str(e).splitlines()[0][:160]})") from None
        if sorted(keys) == ["clip_g", "clip_l"]:  # SDXL's pair: named by the file
            return path.stem
        check(len(keys) == 1, f"--embedding {path}: holds {len(keys)} tensors ({', '.join(keys[:3])}); an SD "
              "embedding holds one, an SDXL one clip_l and clip_g")
        if keys[0] != "emb_params":
            return keys[0]
    return path.stem


def load_embeddings(c, specs, allow_unsafe_pickle: bool = False) -> str:
    """Load each embedding into c's tokenizer and text encoder; returns what PNGs record
    ("token@sha256[:10], ...")."""
    from ldm_cli.models.lora import file_hash, loader_pipeline

    pipe, recorded = loader_pipeline(c), []
    for spec in specs:
        path, token = parse_spec(spec)
        path = runs.product(path, "embedding")  # an `ldm train --textual-inversion` run: its embedding
        check(path.is_file(), f"--embedding {spec}: file not found")
        token = token or default_token(path)
        check(path.suffix.lower() not in PICKLE or allow_unsafe_pickle, f"--embedding {spec}: {path.suffix} "
              "files are pickles, which can run code when loaded; use .safetensors or pass --allow-unsafe-pickle")
        check(path.suffix.lower() in PICKLE or path.suffix.lower() == ".safetensors",
              f"--embedding {spec}: expected a .safetensors (or, with --allow-unsafe-pickle, .pt) file")
        vocab = (c.tokenizer or c.tokenizer_2).get_vocab()
        check(token not in vocab, f"--embedding {spec}: the token {token!r} is already a word of this tokenizer; "
              "name another with FILE:TOKEN")
        try:
            if c.family == "sd":
                pipe.load_textual_inversion(str(path), token=token)
            else:
                load_sdxl_pair(pipe, c, path, token)
        except LdmError:
            raise
        except Exception as e:  # noqa: BLE001 (diffusers and safetensors raise many types for a wrong file)
            raise LdmError(f"--embedding {spec}: not an embedding for this model ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
        recorded.append(f"{token}@{file_hash(path)}")
    return ", ".join(recorded)


def load_sdxl_pair(pipe, c, path: Path, token: str) -> None:
    """An SDXL embedding {clip_l: [N, 768], clip_g: [N, 1280]} (A1111's and kohya's format): each half
    into its text encoder, through diffusers' loader as its SDXL docs show (the refiner takes clip_g only)."""
    from safetensors.torch import load_file

    check(path.suffix.lower() == ".safetensors", f"--embedding {path}: SDXL embeddings are .safetensors files")
    pair = load_file(str(path))
    check(sorted(pair) == ["clip_g", "clip_l"], f"--embedding {path}: an SD 1.x/2.x embedding; this model is SDXL "
          "(its embeddings hold clip_l and clip_g)")
    for key, encoder, tokenizer in (("clip_l", c.text_encoder, c.tokenizer), ("clip_g", c.text_encoder_2, c.tokenizer_2)):
        if encoder is not None:
            pipe.load_textual_inversion(pair[key], token=token, text_encoder=encoder, tokenizer=tokenizer)


def expand(prompt: str, tokenizer) -> str:
    """Multi-vector embeddings written out: "tok" -> "tok tok_1 tok_2" (diffusers' maybe_convert_prompt)."""
    added = getattr(tokenizer, "added_tokens_encoder", {})
    if not added:
        return prompt
    for token in set(tokenizer.tokenize(prompt)):
        if token in added and f"{token}_1" in added:
            vectors, i = [token], 1
            while f"{token}_{i}" in added:
                vectors.append(f"{token}_{i}")
                i += 1
            prompt = prompt.replace(token, " ".join(vectors))
    return prompt
