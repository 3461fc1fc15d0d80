"""The benchmark scripts' own logic that runs without a GPU: the kernel-kind table of the GPU-time breakdown,
how train_speed.py reads images/s from a log whose times are taken per flush (also after a failed end), and the
embedded judge's part-by-part scores, interval and emphasis, and the text probe's read of token states."""

import json
import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))


@pytest.mark.parametrize("name,kind", [
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "matmul"),
    ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN", "matmul"),
    ("triton_tem_fused_addmm_0", "matmul"),
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", "attention"),
    ("triton_red_fused_native_group_norm_silu_3", "norm / pointwise (fused)"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "norm / pointwise (fused)"),
    ("Memcpy HtoD (Pageable -> Device)", "copies"),
    ("some_unknown_kernel", "other"),
])
def test_kernel_kinds(name, kind):
    common = pytest.importorskip("common")
    assert common.kernel_kind(name) == kind


def test_train_speed_times_from_flush_to_flush_and_keeps_a_rate_after_a_failed_end(tmp_path, monkeypatch):
    train_speed = pytest.importorskip("train_speed")
    out = tmp_path / "run"
    out.mkdir()
    flush_times = {5: 3.0, 10: 5.0, 15: 6.5, 16: 6.8}  # losses read back every 5 steps and at the end
    log = [{"step": s, "loss": 0.5, "lr": 1e-5, "elapsed_s": flush_times[min(k for k in flush_times if k >= s)]}
           for s in range(1, 17)]
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    class Ended:  # the command's output, and its failed end
        returncode = 1
        stdout = iter(["latent cache /c: 4 entries encoded, 0 reused, 0.1 s\n", "first step done 9.9 s after the "
                       "start, 12.4 s after the command (compile: full; models 3.1 s, data 0.8 s, set-up 0.0 s, "
                       "the step 6.0 s)\n", "ldm: error: disk full\n"])

        def __init__(self, cmd, **kw):
            assert cmd[-2:] == ["--compile", "full"]

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(train_speed.subprocess, "Popen", Ended)
    args = types.SimpleNamespace(batch_size=4, steps=16, cache_dir=tmp_path, results=tmp_path, warmup=6, family="sdxl",
                                 compile="full")
    row = train_speed.run(["ldm"], tmp_path, tmp_path, out, True, 1, args)
    assert row["first_step_phases_s"] == {"before_train": 2.5, "models": 3.1, "data": 0.8, "set_up": 0.0, "step": 6.0}
    assert row["first_step_s"] is not None and row["cache_note"] == "4 entries encoded, 0 reused, 0.1 s"
    # warm-up 6 falls inside the flush at step 10: timed from 10 (5.0 s) to 16 (6.8 s), 6 steps x 4 images
    assert row["images_per_s"] == pytest.approx(24 / 1.8, abs=0.01)
    assert row["error_after_timing"] == "ldm: error: disk full"
    assert row["mfu_pct"] == pytest.approx(100 * 24 / 1.8 * 3 * 6.76 / 989, abs=0.1)


def test_small_training_bench_times_the_shipped_models_unet():
    """bench/train_step.py --part small builds the embedded model's U-Net (the recipe's config) at its latent
    and context shapes, and counts its training FLOPs: 3x a forward."""
    import torch

    from ldm_cli.models.defaults import default_model
    from ldm_cli.models.load import load_components

    train_step = pytest.importorskip("train_step")
    unet, vae, _ = train_step.small_shaped("cpu", torch.float32)
    shipped = load_components(default_model(), device="cpu").unet
    keys = ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "attention_head_dim",
            "cross_attention_dim", "sample_size", "in_channels", "norm_num_groups")
    assert {k: unet.config[k] for k in keys} == {k: shipped.config[k] for k in keys}
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in shipped.parameters())
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 4  # 64 px images, 16x16 latents
    tflop = train_step.training_tflop(unet, 16, (32, 256))
    assert 0.002 < tflop < 0.005, tflop  # counted: 0.00327 (0.84 TFLOP a step of 256)


def test_embedded_judge_parts_interval_and_emphasis(monkeypatch):
    judge_bench = pytest.importorskip("embedded_judge")
    import judge as judges
    import numpy as np
    from scenes import Scene

    a, b, hat = judges.THINGS[0], judges.THINGS[1], judges.ACCS[0]
    scenes = [Scene("wearing", f"a {a} wearing a {hat}", [a], accessory=hat),
              Scene("pair", f"a {a} on the left and a {b} on the right", [a, b], ordered=True),
              Scene("pair", f"a {a} next to a {b}", [a, b])]
    # the wearer found, not its accessory; the ordered pair swapped (both miss); the unordered one swapped (both count)
    got = {"left": np.array([0, 1, 1]), "right": np.array([len(judges.THINGS), 0, 0]),
           "accessory": np.array([1, len(judges.ACCS), len(judges.ACCS)]), "count": np.zeros(3, int),
           "place": np.zeros(3, int)}
    monkeypatch.setattr(judges, "predict", lambda judge, images: got)
    assert judge_bench.parts(None, scenes, np.zeros((3, 64, 64, 3), np.uint8)) == {
        "wearer": 1.0, "accessory": 0.0, "first thing": 0.5, "second thing": 0.5,
        "accessory missed: none drawn": 0.0,  # another accessory was drawn, ...
        "accessory missed: one trained with that wearer": float(not judge_bench.held_out(a, judges.ACCS[1])),
        "accessory missed: one worn in the same place": 1.0,  # a crown for a billed cap: both on the head
        "second missed: one thing drawn": 0.0, "second missed: the first twice": 0.0}  # the ordered pair: swapped
    got["right"][1] = got["left"][1] = 0  # ... now the first thing twice
    assert judge_bench.parts(None, scenes, np.zeros((3, 64, 64, 3), np.uint8))["second missed: the first twice"] == 1
    got["right"][1] = len(judges.THINGS)  # ... now the first thing alone
    assert judge_bench.parts(None, scenes, np.zeros((3, 64, 64, 3), np.uint8))["second missed: one thing drawn"] == 1
    assert judge_bench.wilson(56, 200) == [0.222, 0.346]  # 28% of 200: +-6 points
    assert judge_bench.wilson(0, 200)[0] == 0.0 and judge_bench.wilson(200, 200)[1] == 1.0
    assert judge_bench.emphasised("a cat wearing a top hat, 3d style", 1.3) == "a cat wearing (a top hat:1.3), 3d style"
    assert judge_bench.emphasised("kitten with shades", 1.6) == "kitten with (shades:1.6)"
    assert judge_bench.emphasised("a cat next to an apple", 1.3) == "a cat next to an apple"


def test_embedded_judge_through_vae_gives_the_decoded_pictures():
    judge_bench = pytest.importorskip("embedded_judge")
    import numpy as np
    import torch

    class Vae(torch.nn.Module):  # halves the picture on the way through: what comes back must show it
        config = type("C", (), {"scaling_factor": 1.0})()

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def encode(self, x):
            return type("O", (), {"latents": x * 0.5})()

        def decode(self, z, return_dict=False):
            return (z * self.w,)

    c = type("C", (), {"vae": Vae(), "device": "cpu", "dtype": torch.float32, "vae_tiling": "off", "vae_scale": 1,
                       "batch_invariant": False})()
    real = np.full((3, 8, 8, 3), 255, np.uint8)
    real[1] = 0
    out = judge_bench.through_vae(c, real, batch=2)
    assert out.shape == real.shape and out.dtype == np.uint8
    # 255 -> [-1, 1] 1.0 -> halved 0.5 -> [0, 1] 0.75 -> 191; 0 -> -1 -> -0.5 -> 0.25 -> 64
    assert (out[0] == 191).all() and (out[1] == 64).all() and (out[2] == 191).all()


def test_text_probe_reads_a_token_wherever_it_stands_and_not_noise():
    probe = pytest.importorskip("embedded_text_probe")
    import torch

    def states(n, seed, random_labels=False):  # the class is the one token of 5 that carries a class vector
        g = torch.Generator().manual_seed(seed)
        table = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
        x, y = torch.randn(n, 8, 16, generator=g) * 0.3, torch.randint(0, 6, (n,), generator=g)
        where = torch.randint(0, 5, (n,), generator=g)
        x[torch.arange(n), where] += table[y]
        mask = torch.ones(n, 8, dtype=torch.long)
        mask[:, 6:] = 0  # padding: the probe must not read it
        x[:, 6:] = 9.0
        return x, mask, torch.randint(0, 6, (n,), generator=g) if random_labels else y

    right, = probe.fit_and_score(states(2000, 1), [states(500, 2)], classes=6, steps=300)
    noise, = probe.fit_and_score(states(2000, 1, True), [states(500, 2, True)], classes=6, steps=300)
    assert right > 0.9 and noise < 0.35, (right, noise)


def test_top_kernels_largest_first_names_cut():
    common = pytest.importorskip("common")
    long = "void at::native::" + "x" * 200
    top = common.top_kernels({"a": 1.0, long: 3.256, "b": 2.0, "c": 0.5}, n=3)
    assert top == [[long[:100], 3.26], ["b", 2.0], ["a", 1.0]]


def test_kernel_times_leave_out_user_annotations():
    """The profiler puts record_function's ranges (AdamW's "Optimizer.step#AdamW.step") on the GPU's timeline,
    spanning the kernels they launched: counted as kernels, AdamW's time was counted twice."""
    common = pytest.importorskip("common")
    import torch

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    ev = types.SimpleNamespace
    events = [ev(name="Optimizer.step#AdamW.step", device_type=cuda, device_time_total=9000.0, is_user_annotation=True),
              ev(name="multi_tensor_apply_kernel<AdamW>", device_type=cuda, device_time_total=8960.0,
                 is_user_annotation=False),
              ev(name="sm90_xmma_fprop_implicit_gemm_bf16", device_type=cuda, device_time_total=4000.0,
                 is_user_annotation=False),
              ev(name="aten::add", device_type=cpu, device_time_total=500.0, is_user_annotation=False)]
    by_kind, unnamed = common.kernel_times(events, calls=2)
    assert by_kind == {"other": 4.48, "convolution": 2.0}
    assert unnamed == {"multi_tensor_apply_kernel<AdamW>": 4.48}


def test_tuning_bench_compiles_ldms_step_with_the_runs_inductor_options_and_puts_the_shipped_levers_back():
    """bench/train_tuning.py times ldm's own step with inductor's tuning options added: inside `tuned`, the
    speed_up that ldm's set-up calls compiles the U-Net with exactly those options (the eager step, `none`, left
    eager; `cl-cdt` in channels_last with the layout's options too); outside it, the shipped speed_up is back (the
    next run, and `full`, time what users get)."""
    import torch

    train_tuning = pytest.importorskip("train_tuning")
    from ldm_cli.train import fast

    class Recording(torch.nn.Conv2d):  # a U-Net stand-in that records how it was compiled
        def compile(self, **kw):
            self.compiled_with = kw

    shipped, cuda = fast.speed_up, torch.device("cuda")
    unet, eager, layout = Recording(4, 4, 3), Recording(4, 4, 3), Recording(4, 4, 3)
    with train_tuning.tuned(train_tuning.INDUCTOR["autotune"]):
        fast.speed_up(unet, "full", cuda)
        fast.speed_up(eager, "none", cuda)  # the eager step losses are compared with
    assert unet.compiled_with == {"options": {"max_autotune": True}}
    assert not hasattr(eager, "compiled_with") and fast.speed_up is shipped
    assert not unet.weight.is_contiguous(memory_format=torch.channels_last)
    with train_tuning.tuned(train_tuning.INDUCTOR["cl-cdt"], channels_last=True):
        fast.speed_up(layout, "full", cuda)
    assert layout.weight.is_contiguous(memory_format=torch.channels_last)
    options = layout.compiled_with["options"]
    assert options["coordinate_descent_tuning"] and options["conv_1x1_as_mm"] and "post_grad_custom_post_pass" in options
    with train_tuning.tuned(None, as_shipped=True):
        assert fast.speed_up is shipped
    nchw = Recording(4, 4, 3)
    with train_tuning.tuned(None):  # `nchw`: the layout and GroupNorm that shipped before, inductor's defaults
        fast.speed_up(nchw, "full", cuda)
    assert nchw.compiled_with == {"options": None} and nchw.weight.is_contiguous()
    assert set(train_tuning.INDUCTOR) < set(train_tuning.RUNS)


def test_training_flops_split_by_kernel_kind_and_each_kinds_rate():
    """SD-1.5's FLOPs by kind as bench/train_flops.py sorts them: the 1x1 convolutions against a count by
    hand (the transformers' proj_in/proj_out, the ResNet shortcuts), the split's total equal to the MFU
    convention's 3x forward, and a kind's rate from a profiled row."""
    train_flops = pytest.importorskip("train_flops")
    fwd = train_flops.forward_gflop()
    proj = sum(n * 4 * hw * c * c for n, hw, c in ((5, 4096, 320), (5, 1024, 640), (5, 256, 1280), (1, 64, 1280)))
    shortcut_inputs = ((1024, 320, 640), (256, 640, 1280), *((64, 2560, 1280),) * 3, (256, 2560, 1280),
                       (256, 2560, 1280), (256, 1920, 1280), (1024, 1920, 640), (1024, 1280, 640),
                       (1024, 960, 640), (4096, 960, 320), (4096, 640, 320), (4096, 640, 320))
    shortcuts = sum(2 * hw * cin * cout for hw, cin, cout in shortcut_inputs)
    assert fwd["conv1x1"] == pytest.approx((proj + shortcuts) / 1e9, rel=1e-9)
    assert sum(fwd.values()) == pytest.approx(803.3, abs=0.1)  # the 2.40 TFLOP a training image of the MFU figures
    # 5 self-attentions over 4096 tokens at 320 wide dominate: QK^T and AV, 2 x 2 x 4096^2 x 320 FLOPs each
    assert fwd["attention"] > 5 * 4 * 4096**2 * 320 / 1e9
    for as_mm in (True, False):
        train = train_flops.training_gflop_by_kind(fwd, as_mm)
        assert sum(train.values()) == pytest.approx(3 * sum(fwd.values()))
    as_mm, as_conv = (train_flops.training_gflop_by_kind(fwd, m)["matmul"] for m in (True, False))
    moved = as_mm - as_conv
    assert moved == pytest.approx(fwd["conv1x1"])  # the forward's only: the backward stays cuDNN's
    gflop = {"convolution": 1000.0, "matmul": 500.0, "attention": 250.0}
    row = {"batch": 32, "wall_ms": 100.0, "convolution_ms": 40.0, "matmul_ms": 20.0, "attention_ms": 20.0}
    kinds = train_flops.rates(gflop, row, ceiling=800.0)
    assert [k["tflops"] for k in kinds] == [800, 800, 400]  # 32 TFLOP in 40 ms; 16 in 20; 8 in 20
    assert kinds[2]["of_ceiling_pct"] == 50.0
    ifs = train_flops.what_ifs(kinds, row, ceiling=800.0)
    assert ifs["attention_at_conv_rate_ms"] == 90.0 and ifs["compute_at_ceiling_ms"] == 90.0


def test_tuning_bench_pads_attention_heads_without_changing_the_output():
    """train_tuning.py's `pad` run: diffusers' attention with heads of 40 padded with zeros to 64 gives the same
    output (the scale kept 1/sqrt(40)), and the library's own functional module is put back after."""
    import torch
    from diffusers.models import attention_processor
    from diffusers.models.attention_processor import Attention

    train_tuning = pytest.importorskip("train_tuning")
    torch.manual_seed(0)
    attn = Attention(query_dim=80, heads=2, dim_head=40).eval()
    x = torch.randn(2, 16, 80)
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, *args, **kw):
        calls.append(q.shape[-1])
        return real(q, *args, **kw)

    with torch.no_grad():
        ref = attn(x)
        with train_tuning.padded_heads(), pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
            out = attn(x)
    assert calls == [64]  # the kernel saw padded heads
    assert torch.allclose(out, ref, atol=1e-6), (out - ref).abs().max()
    assert attention_processor.F is torch.nn.functional
