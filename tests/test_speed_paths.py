"""The fast paths compute what the plain path computes: memory layout, batched TTA, bf16, fused SGD,
torch.compile's fallback, and the benchmark that measures them. No test here looks at a clock."""
import pytest
import torch

import benchmark
import cli
import devices
import framework
import inference
import networks
from errors import UserError


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread while these tests run. On shared CI cores, OpenMP threads that outnumber the
    free cores spin against each other and a CPU step gets many times slower; the comparisons below
    run both paths under the same setting, so they do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cenet(seed=0):
    torch.manual_seed(seed)
    return networks.build_model("cenet").eval()


def settings_with(**overrides):
    settings = cli.default_settings()
    settings.update(DEVICE="cpu", PRETRAINED="none", VISDOM=False)
    settings.update(overrides)
    return settings


# --- inference ----------------------------------------------------------------------------

@torch.no_grad()
def test_channels_last_forward_matches_contiguous():
    model, images = cenet(), torch.randn(2, 3, 32, 32)
    plain = model(images)
    last = model.to(memory_format=torch.channels_last)(images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(last, plain, rtol=1e-4, atol=1e-4 * plain.abs().max().item())


def test_tta_batched_over_images_equals_one_image_at_a_time():
    model, images = cenet(), torch.randn(5, 3, 32, 32)  # 5: the last batch of 4 is a partial one
    one = inference.predict(model, images, torch.device("cpu"), tta=True, images_per_batch=1)
    four = inference.predict(model, images, torch.device("cpu"), tta=True, images_per_batch=4)
    assert four.shape == (5, 1, 32, 32)
    torch.testing.assert_close(four, one, rtol=1e-5, atol=1e-6)
    budget = inference.predict(model, images, torch.device("cpu"), tta=True)  # batches by pixel budget
    torch.testing.assert_close(budget, one, rtol=1e-5, atol=1e-6)


def test_an_image_too_large_for_all_its_views_sends_them_a_few_at_a_time(monkeypatch):
    model, images = cenet(), torch.randn(2, 3, 32, 32)
    whole = inference.predict(model, images, torch.device("cpu"), tta=True)
    passes = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda batch: passes.append(len(batch)) or forward(batch))
    monkeypatch.setattr(inference, "PIXELS_PER_FORWARD", 3 * 32 * 32)  # three views of one image a pass
    grouped = inference.predict(model, images, torch.device("cpu"), tta=True)
    assert passes == [3, 3, 2, 3, 3, 2]
    torch.testing.assert_close(grouped, whole, rtol=1e-5, atol=1e-6)


def symmetric_conv(symmetric):
    """3x3 convolution whose kernel is (or is not) invariant under the 8 flips of the square: with zero
    padding such a convolution commutes with every flip, so TTA must leave its prediction unchanged."""
    import data
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(3, 1, 3, padding=1)
    if symmetric:
        with torch.no_grad():
            conv.weight.copy_(torch.stack([data.dihedral(conv.weight, k) for k in range(8)]).mean(0))
    return conv


def test_tta_of_a_flip_equivariant_model_is_its_plain_prediction():
    images, device = torch.randn(3, 3, 32, 32), torch.device("cpu")
    model = symmetric_conv(symmetric=True)
    plain = inference.predict(model, images, device, tta=False)
    torch.testing.assert_close(inference.predict(model, images, device, tta=True), plain, rtol=0, atol=1e-6)
    # The same check can fail: an ordinary kernel is not flip-equivariant, and TTA changes its output.
    model = symmetric_conv(symmetric=False)
    with_tta = inference.predict(model, images, device, tta=True)
    assert (with_tta - inference.predict(model, images, device, tta=False)).abs().max() > 1e-3


def test_a_rescaled_prediction_comes_back_at_native_size_and_in_place():
    """PATCH_SCALE 1.5: a pointwise model (1x1 convolution, so its prediction is its input's, resampled)
    predicts a smooth 30 x 24 image at 45 x 36 and hands back 30 x 24 probabilities equal, up to
    resampling, to those of the native prediction; a non-square, odd-sized second image comes back at its
    own size."""
    import tasks
    rows, cols = torch.meshgrid(torch.arange(30.0), torch.arange(24.0), indexing="ij")
    ramp = (60 + 3 * rows + 2 * cols).round().to(torch.uint8).numpy()
    image = ramp[..., None].repeat(3, -1)
    samples = [tasks.Sample("a", image, (ramp > 120).astype("uint8")),
               tasks.Sample("b", image[:25, :21], (ramp[:25, :21] > 120).astype("uint8"))]
    model = torch.nn.Conv2d(3, 1, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.zero_()
    model.num_classes = 1
    options = dict(tta=True, amp=False, fmt=torch.contiguous_format)
    seen = []
    model.register_forward_hook(lambda module, inputs, output: seen.append(tuple(inputs[0].shape[-2:])))
    native = inference.predict_native(model, samples, torch.device("cpu"), **options)
    scaled = inference.predict_native(model, samples, torch.device("cpu"), scale=1.5, **options)
    assert seen == [(32, 32), (64, 64)]  # native: padded to 32; 45 x 36: padded to 64
    assert [tuple(prob.shape) for prob in scaled] == [(1, 30, 24), (1, 25, 21)]
    inside = (slice(None), slice(2, -2), slice(2, -2))  # the border resamples against the zero padding
    torch.testing.assert_close(scaled[0][inside], native[0][inside], rtol=0, atol=0.02)
    torch.testing.assert_close(scaled[1][inside], native[1][inside], rtol=0, atol=0.02)


def local_model(kernel):
    """A `kernel` x `kernel` convolution with a fixed random kernel: its output at a pixel depends only on the
    pixels within kernel // 2 of it, so overlapping windows can reproduce a whole-image prediction."""
    torch.manual_seed(3)
    model = torch.nn.Conv2d(3, 1, kernel, padding=kernel // 2)
    model.num_classes = 1
    return model


@pytest.mark.parametrize("tta", [False, True])
def test_overlapping_windows_blend_into_the_whole_image_prediction(tta):
    """Windows of 32 overlapping by 8 over a 90 x 90 image: at each window's inner border, where its own edge
    distorts a 3x3 convolution, the weight is 0, so the blend equals the whole image's prediction."""
    image = torch.randint(0, 256, (3, 90, 90), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    model, options = local_model(3), dict(tta=tta, amp=False, fmt=torch.contiguous_format)
    whole = inference.predict(model, inference.data.normalize(image[None]), torch.device("cpu"), **options)[0]
    tiled = inference.predict_tiled(model, image, torch.device("cpu"), tile=32, overlap=8, **options)
    assert tiled.shape == (1, 90, 90)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-6)


def test_window_offsets_and_weights():
    assert inference.tile_starts(100, 32, 8) == [0, 24, 48, 68]
    assert inference.tile_starts(32, 32, 8) == [0]
    ramp = inference.edge_ramp(8, 4, taper_start=True, taper_end=False)
    assert ramp.tolist() == [0, 0.25, 0.5, 0.75, 1, 1, 1, 1]
    assert inference.edge_ramp(8, 4, False, True).tolist() == [1, 1, 1, 1, 0.75, 0.5, 0.25, 0]


def test_an_image_over_the_whole_image_limit_is_predicted_in_windows_at_its_own_size(monkeypatch):
    """predict_native sends an image whose padded square exceeds WHOLE_IMAGE_PIXELS through windows (a 64 x 90
    image, windows of 32 here) and hands back its native size; a pointwise model gives the same probabilities
    either way."""
    import tasks
    image = torch.randint(0, 256, (64, 90, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    samples = [tasks.Sample("big", image.numpy(), torch.zeros(64, 90, dtype=torch.uint8).numpy())]
    model, options = local_model(1), dict(tta=True, amp=False, fmt=torch.contiguous_format)
    whole = inference.predict_native(model, samples, torch.device("cpu"), **options)[0]
    seen = []
    model.register_forward_hook(lambda module, inputs, output: seen.append(tuple(inputs[0].shape[-2:])))
    monkeypatch.setattr(inference, "WHOLE_IMAGE_PIXELS", 64 * 64)
    monkeypatch.setattr(inference, "TILE_SIDE", 32)
    monkeypatch.setattr(inference, "TILE_OVERLAP", 8)
    tiled = inference.predict_native(model, samples, torch.device("cpu"), **options)[0]
    assert set(seen) == {(32, 32)} and len(seen) == 3 * 4  # 3 rows x 4 columns of windows, 8 views in one pass
    assert tiled.shape == whole.shape == (1, 64, 90)
    torch.testing.assert_close(tiled, whole.cpu(), rtol=0, atol=1e-6)


@torch.no_grad()
def test_bf16_autocast_forward_is_close_to_fp32():
    model, images = cenet(), torch.randn(2, 3, 32, 32)
    plain = model(images)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(images)
    except RuntimeError as error:
        pytest.skip(f"bf16 autocast does not run on this CPU: {error}")
    assert low.dtype == torch.bfloat16
    scale = plain.abs().max().item()
    torch.testing.assert_close(low.float(), plain, rtol=0.05, atol=0.05 * scale)
    assert (networks.probabilities(low.float()) - networks.probabilities(plain)).abs().max() < 0.01


# --- training -----------------------------------------------------------------------------

def test_fused_sgd_is_the_same_update_as_plain_sgd():
    """benchmark.py --sgd-kernel fused offers the fused kernel on CUDA; on the CPU it must reproduce the per-tensor loop,
    with momentum, weight decay and an LR that changes every step as the poly schedule does."""
    torch.manual_seed(0)
    shapes = [(16, 3, 3, 3), (16,), (1, 16, 1, 1)]
    plain = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    fused = [torch.nn.Parameter(parameter.detach().clone()) for parameter in plain]
    optimizers = [torch.optim.SGD(params, lr=4e-3, momentum=0.9, weight_decay=1e-4, fused=flag)
                  for params, flag in ((plain, False), (fused, True))]
    for step in range(4):
        gradients = [torch.randn(shape) for shape in shapes]
        for params, optimizer in zip((plain, fused), optimizers):
            for parameter, gradient in zip(params, gradients):
                parameter.grad = gradient.clone()
            for group in optimizer.param_groups:
                group["lr"] = framework.poly_lr(4e-3, step, 4, 0.9)
            optimizer.step()
    for a, b in zip(plain, fused):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


class FailInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("backward graph failed to compile")


class BrokenCompiled:
    """What torch.compile hands back on a machine where compilation fails later: a callable that raises
    at its first call, in the forward or (after running the model) in the backward."""

    def __init__(self, model, where):
        self.model, self.where, self.calls = model, where, 0

    def __call__(self, images):
        self.calls += 1
        if self.where == "forward":
            raise RuntimeError("InductorError: no working C++ compiler")
        return FailInBackward.apply(self.model(images))


def tiny_training(steps=2):
    """A few real Trainer steps of a small conv net with BatchNorm on synthetic 32 px images."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 1, 1))
    model.num_classes = 1  # what the Trainer reads to build the loss, as every registered network has
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    labels = (torch.rand(4, 32, 32) > 0.7).to(torch.uint8)
    return model, images, labels


@pytest.mark.parametrize("where", ["at torch.compile", "forward", "backward"])
def test_failed_compile_falls_back_to_the_eager_run(where, monkeypatch, capsys):
    settings = settings_with(BATCH_SIZE=2, EPOCHS=2, COMPILE=False)
    model, images, labels = tiny_training()
    eager = framework.Trainer(model, images, labels, framework.TrainConfig.from_settings(settings),
                              torch.device("cpu"))
    eager_losses = [eager.step().item() for _ in range(2)]

    broken = []

    def fake_compile(model, **options):
        if where == "at torch.compile":
            raise RuntimeError("torch.compile is not supported on this platform")
        broken.append(BrokenCompiled(model, where))
        return broken[-1]

    monkeypatch.setattr(torch, "compile", fake_compile)
    model, images, labels = tiny_training()
    trainer = framework.Trainer(model, images, labels, framework.TrainConfig.from_settings(settings, compile=True),
                                torch.device("cpu"))
    losses = [trainer.step().item() for _ in range(2)]

    notices = [line for line in capsys.readouterr().err.splitlines() if "torch.compile unavailable" in line]
    assert len(notices) == 1 and "running eagerly" in notices[0]
    assert trainer.forward is trainer.eager_forward
    assert [compiled.calls for compiled in broken] == ([] if where == "at torch.compile" else [1])
    # Same losses and bit-identical weights and BatchNorm statistics as a run that never tried to compile.
    assert losses == eager_losses
    for (name, value), expected in zip(trainer.model.state_dict().items(), eager.model.state_dict().values()):
        assert torch.equal(value, expected), name


# --- the benchmark ------------------------------------------------------------------------

def figures_in(output):
    """The `| figure | value |` rows of benchmark.py's table."""
    rows = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] not in ("figure", "---"):
            rows[cells[0]] = cells[1]
    return rows


def test_benchmark_runs_and_prints_its_figures(small_drive, capsys):
    benchmark.main(["--device", "cpu", "--image-size", "64", "--batch-size", "2", "--steps", "2", "--warmup", "1",
                    "--data-root", str(small_drive)])
    stdout = capsys.readouterr().out
    figures = figures_in(stdout)
    assert figures["peak GPU memory, training (GiB)"] == "n/a"
    numbers = {name: float(value) for name, value in figures.items() if value != "n/a"}
    for name in ("train throughput (img/s)", "train step (ms)", "inference throughput, eager, no TTA (img/s)",
                 "evaluate 2 test images with 8-way TTA, all outputs, after model load (s)",
                 "evaluate, including model load and reading the images (s)"):
        assert numbers[name] > 0, name
    projected = [name for name in numbers if name.startswith("projected main.py run, 300 steps")]
    assert projected and numbers[projected[0]] > 0  # 300 epochs of ceil(2 images / batch 2) steps
    # AMP is on by default: bf16 + channels_last on a CPU with native bf16, fp32 NCHW elsewhere.
    runs_as = "bf16, NCHW" if devices.cpu_capability()[1] else "fp32, NCHW"
    assert f"{runs_as}, eager, batch 2" in stdout


def test_benchmark_announces_each_phase_that_would_outlast_the_limit(small_drive, capsys, monkeypatch):
    monkeypatch.setattr(benchmark, "LONG_WAIT_SECONDS", 0)  # every phase counts as long
    benchmark.main(["--device", "cpu", "--image-size", "64", "--batch-size", "2", "--steps", "3", "--warmup", "2",
                    "--tta", "false", "--data-root", str(small_drive)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("benchmark: ")]
    assert len(lines) == 3, lines
    assert lines[0].startswith("benchmark: training: about ") and "so 4 more steps take about" in lines[0]
    assert lines[1].startswith("benchmark: inference on batches of 2 whole 64x64 images: about ")
    assert "so 4 more batches take about" in lines[1]
    assert lines[2].startswith("benchmark: evaluation of 2 test images x 1 view(s): about ")
    assert lines[2].endswith("(--no-eval skips it)")


def test_a_short_phase_is_not_announced(capsys):
    benchmark.announce_long_wait("training", 0.5, 100, "steps")
    assert capsys.readouterr().err == ""
    benchmark.announce_long_wait("training", 0.5, 200, "steps")
    assert capsys.readouterr().err == "benchmark: training: about 0.5 s each, so 200 more steps take about 100 s " \
                                      "(fewer --steps shorten it)\n"


@pytest.mark.parametrize("flags", [["--steps", "0"], ["--warmup", "-1"], ["--compare-batches", "8"],
                                   ["--compare-batches", "0,32"]])
def test_benchmark_bad_flags_are_user_errors(flags):
    with pytest.raises(UserError):
        benchmark.parse_args(flags)


def test_compare_rows_keep_only_what_differs_on_the_device(monkeypatch):
    settings = settings_with()
    batches = {"small": 8, "large": 32}
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    on_gpu = benchmark.compare_configurations(settings, batches, gpu, 1)
    assert [benchmark.describe(row, gpu, 1) for _, row, _ in on_gpu] == [
        "fp32, NCHW, eager, batch 8", "bf16, channels_last, eager, batch 32", "bf16, channels_last, compiled, batch 32"]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert benchmark.describe(on_gpu[1][1], gpu, 1) == "fp16 + loss scaling, channels_last, eager, batch 32"
    # Under torchrun on GPUs the compile row runs eagerly (see framework.compile_useful), so it is not measured.
    assert len(benchmark.compare_configurations(settings, batches, gpu, 2)) == 2


@pytest.mark.parametrize("native_bf16, expected", [
    (True, ["fp32, NCHW, eager, batch 8", "fp32, channels_last, eager, batch 8", "bf16, NCHW, eager, batch 8",
            "bf16, channels_last, eager, batch 8", "bf16, NCHW, compiled, batch 8"]),
    # Without native bf16 the AMP rows are the first two again, so only the compiled form is measured.
    (False, ["fp32, NCHW, eager, batch 8", "fp32, channels_last, eager, batch 8", "fp32, NCHW, compiled, batch 8"]),
])
def test_cpu_compare_rows_follow_the_bf16_capability(native_bf16, expected, monkeypatch):
    monkeypatch.setattr(devices, "cpu_capability", lambda query=None: ("test CPU", native_bf16))
    cpu = torch.device("cpu")
    rows = benchmark.compare_configurations(settings_with(BATCH_SIZE=8), {"small": 2, "large": 32}, cpu, 1)
    assert [benchmark.describe(row, cpu, 1, layout) for _, row, layout in rows] == expected
