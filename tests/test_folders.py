"""Training on real folders: aspect-ratio buckets, DreamBooth class images, tag captions, validation loss,
zero terminal SNR (the tiny model, CPU)."""

import json
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from ldm_cli.jobs import Settings
from ldm_cli.models.load import load_components
from ldm_cli.sample import pipeline
from ldm_cli.train import buckets
from ldm_cli.train.batches import Batches
from ldm_cli.train.config import TrainConfig
from ldm_cli.train.data import find_examples
from ldm_cli.train.loop import train

SHAPES = {"4x3": (96, 72), "3x4": (72, 96), "16x9": (128, 72), "1x1": (64, 64), "tiny": (64, 48)}


def draw(size, colour, seed) -> Image.Image:
    rng = random.Random(seed)
    w, h = size
    im = Image.new("RGB", size, "white")
    r = min(w, h) // 3
    cx, cy = w // 2 + rng.randint(-w // 8, w // 8), h // 2
    ImageDraw.Draw(im).ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    return im


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Phone-photo shapes: 3 images each at 4:3, 3:4, 16:9, 1:1, and one tiny 64x48, .txt captions."""
    root = tmp_path_factory.mktemp("photos")
    for i, (name, size) in enumerate(sorted(SHAPES.items())):
        for k in range(1 if name == "tiny" else 3):
            draw(size, (40 * i, 200 - 30 * k, 90), i * 10 + k).save(root / f"{name}-{k}.png")
            (root / f"{name}-{k}.txt").write_text(f"a circle in a {name} picture")
    return root


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


def base(data, tiny_model, tmp_path, **kw):
    return dict(data_dir=str(data), model=str(tiny_model), batch_size=2, lr=1e-3, seed=2, device="cpu",
                cache_dir=str(tmp_path / "cache"), **kw)


def test_bucket_sizes_are_kohyas():
    """kohya's make_bucket_resolutions at 512 px, 256..1024, steps of 64, written out from its published values."""
    sizes = buckets.bucket_sizes(buckets.default_spec(512, None, None, None))
    assert (512, 512) in sizes and (256, 1024) in sizes and (1024, 256) in sizes and (640, 384) in sizes
    assert (576, 448) in sizes and (448, 576) in sizes and (768, 320) in sizes
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in sizes) and len(sizes) == 17


def test_buckets_crop_at_most_the_rounding_one_shape_a_batch_and_resume_bitwise(photos, tiny_model, tmp_path,
                                                                                 monkeypatch):
    sizes = buckets.bucket_sizes(buckets.default_spec(64, None, None, None))
    bound = max(1 - math.exp(-buckets.rounding(sizes, b)) for b in sizes)
    for path in sorted(photos.glob("*.png")):
        size = Image.open(path).size
        b = buckets.assign(size, sizes)
        distance = [abs(math.log(size[0] / size[1] * o[1] / o[0])) for o in sizes]
        assert abs(math.log(size[0] / size[1] * b[1] / b[0])) == pytest.approx(min(distance))  # the nearest
        w, h, _, _ = buckets.cover_crop(size, b)
        lost = 1 - b[0] * b[1] / (w * h)  # the share of the (resized) image the crop throws away
        assert lost <= bound + 2 / min(b), (path.name, b, lost, bound)
        if size[0] != size[1]:
            assert b[0] != b[1] and lost < 0.1, (path.name, b, lost)  # a square crop would lose 25-44%
    shapes_seen = []
    real_loss = __import__("ldm_cli.train.loop", fromlist=["x"]).diffusion_loss

    def spy(unet, schedule, latents, *a, **k):
        shapes_seen.append(tuple(latents.shape))
        return real_loss(unet, schedule, latents, *a, **k)

    monkeypatch.setattr("ldm_cli.train.loop.diffusion_loss", spy)
    notes = []
    cfg = base(photos, tiny_model, tmp_path, max_steps=8, checkpoint_every=4)
    straight = train(TrainConfig(out_dir=str(tmp_path / "straight"), **cfg), say=notes.append)
    assert "buckets: 56x72: 3, 64x64: 3, 72x56: 4, 80x48: 3" in notes
    assert len({s[2:] for s in shapes_seen}) >= 3 and all(s[0] == 2 for s in shapes_seen)
    train(TrainConfig(out_dir=str(tmp_path / "resumed"), **{**cfg, "max_steps": 4}))
    resumed = train(TrainConfig(out_dir=str(tmp_path / "resumed"), **cfg), resume="latest")
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    a, b = (load_components(str(m), device="cpu").unet.state_dict() for m in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_every_batch_is_one_bucket_and_an_epoch_sees_every_image(photos):
    examples, _ = find_examples(photos)
    sizes = buckets.bucket_sizes(buckets.default_spec(64, None, None, None))
    examples = [e.__class__(e.path, e.caption, buckets.assign(Image.open(e.path).size, sizes)) for e in examples]
    fake = SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")),
                           c=SimpleNamespace(vae=SimpleNamespace(config=SimpleNamespace(scaling_factor=1.0)),
                                             family="sd"))
    b = Batches(TrainConfig(data_dir="x", seed=5, batch_size=2), examples, fake, None, 1, 0)
    per_epoch = sum(-(-len(g) // 2) for g in b.groups)
    for epoch in range(2):
        batches = [b.pick(i, 2) for i in range(epoch * per_epoch, (epoch + 1) * per_epoch)]
        assert all(len({e.bucket for e in batch}) == 1 for batch in batches)
        assert {e.path for batch in batches for e in batch} == {e.path for e in examples}
    assert [b.pick(i, 2) for i in range(per_epoch)] != [b.pick(i, 2) for i in range(per_epoch, 2 * per_epoch)]


def test_dreambooth_draws_class_images_once_and_weighs_the_prior(photos, tiny_model, tmp_path):
    instance = tmp_path / "sks"
    instance.mkdir()
    for p in sorted(photos.glob("1x1-*.png")):
        (instance / p.name).write_bytes(p.read_bytes())  # no captions: the instance prompt
    dogs = tmp_path / "dogs"
    cfg = base(instance, tiny_model, tmp_path, max_steps=2, instance_prompt="photo of sks circle",
               class_data=str(dogs), class_prompt="a red circle", num_class_images=3, validation_steps=2)
    notes = []
    first = {}
    for w in (1.0, 0.0, 2.0):
        train(TrainConfig(out_dir=str(tmp_path / f"w{w}"), **{**cfg, "prior_loss_weight": w}), say=notes.append)
        first[w] = losses(tmp_path / f"w{w}")[0]
        if w == 1.0:
            made = sorted(dogs.glob("*.png"))
            assert [p.name for p in made] == ["class-00000.png", "class-00001.png", "class-00002.png"]
            stamps = [p.stat().st_mtime_ns for p in made]
    assert sum("drawing 3 class images" in n for n in notes) == 1  # the later runs reuse them
    assert [p.stat().st_mtime_ns for p in sorted(dogs.glob("*.png"))] == stamps
    # class image i is the model's own picture of the class prompt at seed i, through our sampler
    c = load_components(str(tiny_model), device="cpu")
    pic = pipeline.txt2img(c, ["a red circle"], [""], [1], Settings(steps=2, width=64, height=64))
    ours = np.asarray(Image.open(dogs / "class-00001.png")).astype(float) / 255
    assert np.abs(ours - pic[0].permute(1, 2, 0).numpy()).max() <= 1 / 255 + 1e-6
    # loss = instance + w * prior (Ruiz et al. eq. 2): the first step's loss is linear in w, with a prior > 0
    prior = first[1.0] - first[0.0]
    assert prior > 1e-4 and first[2.0] - first[0.0] == pytest.approx(2 * prior, rel=1e-4)


def test_shuffled_tags_follow_the_seed_and_keep_the_leading_tags(tiny_model, tmp_path, monkeypatch):
    tags = tmp_path / "tags"
    tags.mkdir()
    for i in range(4):
        draw((64, 64), (200, 40 * i, 40), i).save(tags / f"{i}.png")
        (tags / f"{i}.caption").write_text(f"circle{i}, red, round, white background, simple")
    seen = []
    real = __import__("ldm_cli.train.batches", fromlist=["x"]).Encoders.captions
    monkeypatch.setattr("ldm_cli.train.batches.Encoders.captions",
                        lambda self, caps: seen.append(list(caps)) or real(self, caps))

    def run(name, seed):
        seen.clear()
        train(TrainConfig(out_dir=str(tmp_path / name), **{**base(tags, tiny_model, tmp_path, max_steps=6),
                          "seed": seed, "shuffle_tags": True, "keep_tokens": 2, "caption_prefix": "sks, ",
                          "caption_dropout": 0.0}))
        assert len(seen) == 6  # one encoding a step: shuffled tags are not cached
        return [c for batch in seen for c in batch]

    a, b, other = run("a", 1), run("b", 1), run("c", 2)
    assert len(a) == 12 and a == b and a != other
    for caption in a:
        parts = caption.split(", ")
        assert parts[:2] == ["sks", parts[1]] and parts[1].startswith("circle")
        assert sorted(parts[2:]) == ["red", "round", "simple", "white background"]
    assert len({tuple(c.split(", ")[2:]) for c in a}) > 3  # the orders do change


def test_validation_loss_is_the_same_on_two_runs(photos, tiny_model, tmp_path):
    def run(name, seed):
        train(TrainConfig(out_dir=str(tmp_path / name), **{**base(photos, tiny_model, tmp_path, max_steps=4,
                          validation_split=0.25, validate_every=2), "seed": seed}))
        return [r for r in map(json.loads, (tmp_path / name / "log.jsonl").read_text().splitlines())
                if "validation_loss" in r]

    a, b, c = run("a", 1), run("b", 1), run("c", 7)
    assert [r["step"] for r in a] == [2, 4] and a == b and all(math.isfinite(r["validation_loss"]) for r in a)
    assert a != c  # other weights, the same held-out images and noise: other numbers


def test_zero_terminal_snr_trains_v_and_samples_as_diffusers(photos, tiny_model, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    notes = []
    model = train(TrainConfig(out_dir=str(tmp_path / "z"), **base(photos, tiny_model, tmp_path, max_steps=2,
                                                                  zero_terminal_snr=True, buckets="off")),
                  say=notes.append)
    assert any("fine-tuned to predict v" in n for n in notes)
    config = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    assert config["rescale_betas_zero_snr"] and config["prediction_type"] == "v_prediction"
    assert config["timestep_spacing"] == "trailing"
    c = load_components(str(model), device="cpu")
    assert float(c.schedule.alpha_bar[-1]) == pytest.approx(0.0, abs=1e-12)
    ours = pipeline.txt2img(c, ["a circle"], [""], [3], Settings(steps=5, width=64, height=64))
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    theirs = pipe("a circle", num_inference_steps=5, guidance_scale=7.5, output_type="np",
                  generator=torch.Generator("cpu").manual_seed(3)).images
    assert np.abs(ours.permute(0, 2, 3, 1).numpy() - theirs).max() <= 1e-5
    # with the guidance rescale such models are sampled with (Lin et al. sec. 3.4), equal to diffusers' too
    # (a strong scale: the tiny model's two halves barely differ, and the rescale acts on how far apart they are)
    def ours_at(phi):
        s = Settings(steps=5, width=64, height=64, cfg=60.0, guidance_rescale=phi)
        return pipeline.txt2img(c, ["a circle"], [""], [3], s).permute(0, 2, 3, 1).numpy()

    theirs = pipe("a circle", num_inference_steps=5, guidance_scale=60.0, output_type="np", guidance_rescale=0.7,
                  generator=torch.Generator("cpu").manual_seed(3)).images
    rescaled = ours_at(0.7)
    assert np.abs(rescaled - theirs).max() <= 1e-5 and np.abs(rescaled - ours_at(0.0)).max() > 1e-3


def test_guidance_rescale_is_diffusers_rescale_noise_cfg():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    from ldm_cli.diffusion.guidance import guided

    g = torch.Generator().manual_seed(0)
    uncond, cond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g) * 3 + 1
    unet = lambda x, t, context: torch.cat([uncond, cond])  # noqa: E731 (a stand-in network)
    for phi in (0.0, 0.3, 0.7, 1.0):
        ours = guided(unet, torch.zeros(2, 1), torch.zeros(2, 1), 7.5, phi)(torch.zeros(2, 4, 8, 8), torch.zeros(2))
        plain = uncond + 7.5 * (cond - uncond)
        assert torch.allclose(ours, rescale_noise_cfg(plain, cond, guidance_rescale=phi), atol=1e-6)
        assert phi == 0.0 or (ours - plain).abs().max() > 0.1


def test_folder_bad_inputs_are_one_line(ldm_here, photos, tiny_model, tmp_path):
    wide = tmp_path / "wide"
    wide.mkdir()
    draw((400, 40), (0, 0, 200), 0).save(wide / "banner.png")
    (wide / "banner.txt").write_text("a banner")
    not_images = tmp_path / "notes"
    not_images.mkdir()
    (not_images / "readme.txt").write_text("no pictures here")
    common = ("--model", tiny_model, "--device", "cpu", "--max-steps", 1, "--cache-dir", tmp_path / "c")
    for args, says in (
            ((wide, "--out", tmp_path / "o1"), "banner.png: 400x40 has no bucket (the widest is 128x32"),
            ((photos, "--out", tmp_path / "o2", "--class-data", not_images, "--class-prompt", "a dog"),
             "no images in it; add some, or pass --num-class-images N"),
            ((photos, "--out", tmp_path / "o3", "--class-data", not_images), "--class-prompt TEXT"),
            ((photos, "--out", tmp_path / "o4", "--bucket-reso-steps", 12), "must be a multiple of 8"),
            ((photos, "--out", tmp_path / "o5", "--keep-tokens", 2), "--keep-tokens goes with --shuffle-tags")):
        r = ldm_here("train", *args, *common)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and says in r.stderr, (args, r.stderr)
    assert not any((tmp_path / f"o{i}" / "model").exists() for i in range(1, 6))


def test_sdxl_buckets_condition_on_each_images_size_crop_and_bucket(photos, tiny_sdxl, tmp_path, monkeypatch):
    """SDXL's six numbers per image: original (h, w), the crop's (top, left) as the pixels were cut, and the
    bucket (h, w) as the target size; the cached path (from headers) equals loading the pixels."""
    from ldm_cli.train.data import centre_crop_of, load_pixels_and_crop

    seen = []
    real_loss = __import__("ldm_cli.train.loop", fromlist=["x"]).diffusion_loss

    def spy(unet, schedule, latents, context, *a, **k):
        seen.append((tuple(latents.shape[2:]), context.time_ids.tolist()))
        return real_loss(unet, schedule, latents, context, *a, **k)

    monkeypatch.setattr("ldm_cli.train.loop.diffusion_loss", spy)
    train(TrainConfig(out_dir=str(tmp_path / "xl"), **base(photos, tiny_sdxl, tmp_path, max_steps=4)))
    sizes = buckets.bucket_sizes(buckets.default_spec(64, None, None, None))
    expected = {}
    for e in find_examples(photos)[0]:
        e = e.__class__(e.path, e.caption, buckets.assign(Image.open(e.path).size, sizes))
        crop = centre_crop_of(e, 64)
        pixels, loaded = load_pixels_and_crop(e, 64, random.Random(0))
        assert crop == loaded and pixels.shape[1:] == (e.bucket[1], e.bucket[0])
        expected.setdefault(e.bucket, set()).add((*crop, e.bucket[1], e.bucket[0]))
    for latent_hw, ids in seen:
        bucket = (ids[0][5], ids[0][4])  # (w, h) of the target size
        assert all(tuple(i) in expected[tuple(int(v) for v in bucket)] for i in ids)
        assert latent_hw == (ids[0][4] // 2, ids[0][5] // 2)  # the tiny VAE halves each side
