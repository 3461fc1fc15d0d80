"""Which examples each step trains on, and their encoder outputs (from the latent cache or computed).

Determinism: optimizer step k's examples, caption dropout and tag order come from generators seeded by (seed, k),
so a run resumed from the checkpoint of step k goes on exactly as the unbroken run would have.
Processes: each step's global batch of batch_size x processes examples is split between them.
Buckets (train/buckets.py): a batch's examples all come from one bucket, so they stack into one tensor.
"""

import functools
import logging
import random
from dataclasses import replace

import torch

from ldm_cli.diffusion.conditioning import AddedCond
from ldm_cli.errors import LdmError
from ldm_cli.models.codecs import encode_text, encode_text_sdxl
from ldm_cli.train.buckets import epoch_plan
from ldm_cli.train.cache import EncodedData
from ldm_cli.train.config import TrainConfig
from ldm_cli.train.data import centre_crop_of, load_pixels_and_crop, shuffle_tags
from ldm_cli.train.loss import Share, sample_posterior, to_device

log = logging.getLogger("ldm")


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def step_examples(examples, index: int, count: int, seed: int) -> list:
    """The `count` examples of batch `index`: epoch e visits the data in a permutation seeded by (seed, e)."""
    n = len(examples)
    return [examples[_epoch_order(n, seed, i // n)[i % n]] for i in range(index * count, (index + 1) * count)]


class Encoders:
    """The frozen VAE and text encoder as the training loop calls them, under accelerate's autocast."""

    def __init__(self, c, accelerator):
        self.c, self.accelerator = c, accelerator
        self.vae_dtype = next(c.vae.parameters()).dtype
        self.trained_text = None  # with --textual-inversion: the (prepared) text encoder, run with gradients

    def pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, R, R] in [-1, 1] -> posterior parameters [B, 2C, h, w]."""
        c = self.c
        with torch.no_grad(), self.accelerator.autocast():
            if c.batch_invariant:  # one image at a time on CPU: the same bits as the cache (see models/)
                return torch.cat([c.vae.encode(p[None].to(c.device, self.vae_dtype)).latent_dist.parameters.float()
                                  for p in pixels])
            return c.vae.encode(pixels.to(c.device, self.vae_dtype)).latent_dist.parameters.float()

    def captions(self, captions: list[str]):
        """Token states [B, 77, D]; for SDXL (token states, pooled embedding)."""
        c = replace(self.c, device=self.accelerator.device)
        with self.accelerator.autocast():
            if c.family != "sd":
                hidden, pooled = encode_text_sdxl(c, captions)
                return hidden.float(), pooled.float()
            return encode_text(c, captions).float()

    def trained_captions(self, captions: list[str]):
        """Through the text encoder(s) whose new token trains (with gradients), tokenized as encode_text's plain
        syntax does: token states [B, 77, D]; SDXL (token states of both, pooled embedding)."""
        from ldm_cli.models.embeddings import expand
        from ldm_cli.text.encode import states

        c, device = self.c, self.accelerator.device

        def ids(tokenizer):
            tokens = tokenizer([expand(p, tokenizer) for p in captions], padding="max_length", truncation=True,
                               max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
            return to_device(tokens, device)

        rows = range(len(captions)) if c.batch_invariant else [slice(None)]  # one caption at a time on CPU
        with self.accelerator.autocast():
            if c.family == "sd":
                first = ids(c.tokenizer)
                return torch.cat([states(self.trained_text, first[r].reshape(-1, first.shape[1])) for r in rows]).float()
            first, second = ids(c.tokenizer), ids(c.tokenizer_2)
            parts = [self.trained_text(first[r].reshape(-1, first.shape[1]), second[r].reshape(-1, second.shape[1]))
                     for r in rows]
            return torch.cat([h for h, _ in parts]).float(), torch.cat([p for _, p in parts]).float()


class Batches:
    """`batch(step, micro, gen)`: this process's share of micro-batch `micro` of step `step`, as
    (latents, text context) on the device."""

    def __init__(self, cfg: TrainConfig, examples, encoders: Encoders, cached: EncodedData | None,
                 world: int, rank: int):
        self.cfg, self.examples, self.encoders, self.cached = cfg, examples, encoders, cached
        self.world, self.rank = world, rank
        self.share = Share(rank, world)  # noise for the global batch, this process's rows
        self.device = encoders.accelerator.device
        self.scaling_factor = encoders.c.vae.config.scaling_factor
        self.sdxl = encoders.c.family != "sd"
        self.skipped: list[str] = []  # images found unreadable during the run (listed in OUT/skipped.txt)
        self.bad: set = set()
        self.position = {e.path: i for i, e in enumerate(examples)}  # for the replacement of a bad image
        by_bucket: dict = {}
        for i, e in enumerate(examples):
            by_bucket.setdefault(e.bucket, []).append(i)
        # with buckets: the example indices of each bucket, for batches of one shape
        self.groups = tuple(tuple(v) for _, v in sorted(by_bucket.items())) if examples[0].bucket else None
        self.store = self._device_store(cached) if self.device.type == "cuda" else None

    def _device_store(self, cached: EncodedData | None, free_bytes: int | None = None, share_of_free: float = 0.25):
        """(every example's posterior parameters [N, ...], its captions' contexts [M, 77, D] with "" among them,
        the caption rows) on the device, when the cache holds them all, of one shape, SD's single context, and
        they take at most `share_of_free` of the free GPU memory: each step then gathers its batch there instead
        of stacking it on the host and copying it over (~20 ms a step at batch 256 of the embedded model's
        shapes). Else None. The values are the cache's own: the same batches either way."""
        if cached is None or self.sdxl or not cached.context or self.cfg.shuffle_tags or self.cfg.textual_inversion:
            return None
        moments = [cached.moments[e.path] for e in self.examples]
        captions = sorted({e.caption for e in self.examples} | {""})
        if len({m.shape for m in moments}) != 1 or any(not isinstance(cached.context.get(c), torch.Tensor)
                                                       for c in captions):
            return None
        size = moments[0].nbytes * len(moments) + cached.context[""].nbytes * len(captions)
        free = torch.cuda.mem_get_info(self.device)[0] if free_bytes is None else free_bytes
        if size > share_of_free * free:
            return None
        contexts = torch.stack([cached.context[c] for c in captions]).to(self.device)
        return torch.stack(moments).to(self.device), contexts, {c: i for i, c in enumerate(captions)}

    def _pixels(self, e, rng: random.Random) -> tuple[torch.Tensor, tuple]:
        """An example's pixels; an image that cannot be read is skipped (listed), the next readable one in
        the data taken instead, so the step goes on (--strict: the run stops, after its checkpoint)."""
        cfg, n = self.cfg, len(self.examples)
        start = self.position[e.path]
        for k in range(n):
            candidate = self.examples[(start + k) % n]
            if candidate.path in self.bad or candidate.bucket != e.bucket:  # a batch is of one shape
                continue
            try:
                return load_pixels_and_crop(candidate, cfg.resolution, rng, cfg.random_crop, cfg.random_flip)
            except LdmError as err:
                if cfg.strict:
                    raise
                self.bad.add(candidate.path)
                self.skipped.append(str(err))
                log.warning(f"warning: {err}; skipped")
        raise LdmError("no image of the data folder can be read any more")

    def pick(self, index: int, count: int) -> list:
        """The `count` examples of global batch `index`: from one bucket when the examples have buckets."""
        if self.groups is None:
            return step_examples(self.examples, index, count, self.cfg.seed)
        per_epoch = sum(-(-len(g) // count) for g in self.groups)
        plan = epoch_plan(self.groups, count, self.cfg.seed, index // per_epoch)
        return [self.examples[i] for i in plan[index % per_epoch]]

    def caption(self, e, index: int, slot: int) -> str:
        """An example's caption for batch `index`: with --shuffle-tags, its tags in this batch's own order."""
        if not self.cfg.shuffle_tags:
            return e.caption
        return shuffle_tags(e.caption, self.cfg.keep_tokens, random.Random(f"tags {self.cfg.seed} {index} {slot}"))

    def batch(self, step: int, micro: int, gen: torch.Generator):
        cfg = self.cfg
        index = step * cfg.gradient_accumulation + micro
        rng = random.Random((cfg.seed * 7919 + index) * 131 + micro)
        batch = self.pick(index, cfg.batch_size * self.world)
        # decided for the global batch; a new token learns nothing from an empty caption
        drop = [rng.random() < cfg.caption_dropout and not cfg.textual_inversion for _ in batch]
        captions = ["" if d else self.caption(e, index, i) for i, (e, d) in enumerate(zip(batch, drop))]
        mine = slice(self.rank * cfg.batch_size, (self.rank + 1) * cfg.batch_size)
        moments, context = self.encode(batch[mine], captions[mine], rng)
        return sample_posterior(moments, gen, self.share) * self.scaling_factor, context

    def encode(self, batch: list, captions: list[str], rng: random.Random):
        """(posterior parameters on the device, text context) of these examples with these captions."""
        cfg = self.cfg
        if self.store is not None and all(c in self.store[2] for c in captions):
            all_moments, all_contexts, rows = self.store
            pick = to_device(torch.tensor([self.position[e.path] for e in batch]), self.device)
            return all_moments[pick], all_contexts[to_device(torch.tensor([rows[cap] for cap in captions]), self.device)]
        if self.cached is not None:
            moments = to_device(torch.stack([self.cached.moments[e.path] for e in batch]), self.device)
            crops = [centre_crop_of(e, cfg.resolution) for e in batch] if self.sdxl else None
        else:
            loaded = [self._pixels(e, rng) for e in batch]
            moments = self.encoders.pixels(torch.stack([p for p, _ in loaded]))
            crops = [crop for _, crop in loaded]
        if self.encoders.trained_text is not None:  # a new token's vectors train: encoded with gradients
            encoded = self.encoders.trained_captions(captions)
            if not self.sdxl:
                return moments, encoded
            texts = list(zip(*encoded))
        elif self.cached is not None and self.cached.context:  # no texts cached with --shuffle-tags
            texts = [self.cached.context[cap] for cap in captions]
        else:
            encoded = self.encoders.captions(captions)
            texts = list(zip(*encoded)) if self.sdxl else list(encoded)
        if not self.sdxl:
            return moments, to_device(torch.stack(texts), self.device)
        # SDXL's micro-conditioning: original (h, w), crop (top, left), target (h, w) = the bucket, per image
        sizes = [e.bucket or (cfg.resolution, cfg.resolution) for e in batch]
        ids = torch.tensor([[*crop, h, w] for crop, (w, h) in zip(crops, sizes)], dtype=torch.float32)
        return moments, AddedCond(to_device(torch.stack([h for h, _ in texts]), self.device),
                                  to_device(torch.stack([p for _, p in texts]), self.device), to_device(ids, self.device))
