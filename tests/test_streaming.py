"""8B-scale mechanics checked on tiny models: block-streamed forwards, quantization noise without a
second model, the device-memory plan, the in-place SUBS head and loading in the checkpoint's
dtype without random initialisation."""

import copy
import json

import pytest
import torch

from faircalib import hub
from faircalib.calib import streaming
from faircalib.calib.fair import weight_noise
from faircalib.calib.streaming import fit_batch, on_device, quantization_noise
from faircalib.config import FairCalibConfig, QuantConfig
from faircalib.models.base import subs_log_probs
from faircalib.models.io import build_model, load_tensors
from faircalib.quant import quantize_rtn
from llama_like_ckpt import write_family


@pytest.fixture(scope="module")
def model():
    return hub.load("mdlm-tiny")


def batch(model, n=2, length=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, model.vocab_size - 1, (n, length), generator=gen)
    x[:, length // 2 :] = model.mask_id
    return x, torch.full((n,), 0.5)


def test_streamed_forward_equals_the_plain_one_and_holds_one_block_at_a_time(model, monkeypatch):
    x, t = batch(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain = model.log_probs(x, t)
    live, most = [], [0]
    original = streaming._to_device

    def spy(block, device):
        live.append(block)
        most[0] = max(most[0], len(live))
        return original(block, device)

    original_restore = streaming._restore

    def restore_spy(saved):
        live.pop()
        original_restore(saved)

    monkeypatch.setattr(streaming, "_to_device", spy)
    monkeypatch.setattr(streaming, "_restore", restore_spy)
    with torch.no_grad(), on_device(model, "cpu", stream=True):
        streamed = model.log_probs(x, t)
    assert torch.equal(plain, streamed)
    assert most[0] == 1 and not live  # one block visits the device at a time, none stays
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in model.blocks)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_block_noise_equals_an_explicit_noisy_copy_and_leaves_the_model_unchanged(model):
    """The reference: a deep copy whose every quantizable weight is replaced by w + (RTN(w) - w),
    written out here independently of calib.fair."""
    x, t = batch(model, seed=1)
    cfg = FairCalibConfig(bits=3, group_size=32, noise_scale=0.7)
    reference = copy.deepcopy(model)
    base = QuantConfig(3, 32, False)
    with torch.no_grad():
        for block in reference.blocks:
            for _, linear in reference.quantizable_linears(block):
                w = linear.weight.float()
                linear.weight.copy_(w + 0.7 * (quantize_rtn(w, base).weight - w))
        expected = reference.log_probs(x, t)
        with quantization_noise(model, weight_noise(cfg, 0)):
            noisy = model.log_probs(x, t)
        clean = model.log_probs(x, t)
        plain = copy.deepcopy(model).log_probs(x, t)
    assert torch.equal(noisy, expected)
    assert torch.equal(clean, plain) and not torch.equal(clean, noisy)


def test_random_noise_does_not_depend_on_the_order_layers_are_visited(model):
    cfg = FairCalibConfig(bits=4, group_size=32, noise="random")
    fn = weight_noise(cfg, seed=3)
    w = model.quantizable_linears(model.blocks[1])[0][1].weight.detach()
    first = fn(1, 0, w)
    fn(0, 2, w)  # another layer in between
    assert torch.equal(first, fn(1, 0, w)) and not torch.equal(first, fn(1, 1, w))
    rtn = quantize_rtn(w.float(), QuantConfig(4, 32, False)).weight - w.float()
    assert torch.allclose((first - w).norm(), rtn.norm(), rtol=1e-5)  # same size as RTN's error


@pytest.mark.parametrize(
    ("whole", "stream_fixed", "row", "budget", "resident_ok", "expected"),
    [
        (10, 3, 2, 100, True, (False, 32)),  # fits easily: resident, the default batch
        (10, 3, 2, 20, True, (False, 5)),  # resident, (20 - 10) // 2 rows
        (10, 3, 4, 13, True, (True, 2)),  # 10 + 4 > 13: streamed, (13 - 3) // 4
        (10, 3, 50, 40, True, (True, 1)),  # nothing fits: one row at a time, never zero
        (10, 3, 2, 100, False, (True, 32)),  # resident not allowed
    ],
)
def test_fit_batch(whole, stream_fixed, row, budget, resident_ok, expected):
    assert fit_batch(whole, stream_fixed, row, budget, 32, resident_ok) == expected


def test_plan_without_a_cuda_budget_keeps_the_default_batch(model):
    x, t = batch(model, n=1)
    plan = streaming.plan_batch(model, x, t, torch.device("cpu"), None, 32)
    assert (plan.stream, plan.batch) == (False, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_subs_equals_the_autograd_path(dtype):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 13, generator=gen).to(dtype)
    x = torch.randint(0, 12, (3, 9), generator=gen)
    x[:, ::2] = 12
    with torch.no_grad():
        lean = subs_log_probs(logits, x, 12)
    graph = subs_log_probs(logits.clone().requires_grad_(True), x, 12)
    assert torch.equal(lean, graph.detach())
    # the SUBS definition: no mass on [MASK]; committed positions one-hot on their token
    assert torch.isneginf(lean[..., 12]).all()
    committed = x != 12
    assert (lean[committed].exp().argmax(-1) == x[committed]).all()
    assert torch.allclose(lean[~committed].exp().sum(-1), torch.ones(1), atol=1e-5)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_loading_in_bf16_skips_random_init_and_equals_the_reference_load(tmp_path, family):
    directory = write_family(tmp_path / family, family)
    loaded = hub.load(directory, dtype=torch.bfloat16)
    # the reference: built for real, then the checkpoint copied in, then cast
    reference = build_model(json.loads((directory / "config.json").read_text()))
    reference.load_state_dict(load_tensors(directory))
    reference = reference.to(torch.bfloat16).eval()
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in loaded.parameters())
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    x[:, 12:] = loaded.mask_id
    with torch.no_grad():
        assert torch.equal(loaded.log_probs(x), reference.log_probs(x))


def test_quantized_layers_keep_the_model_dtype_and_one_weight_copy(tmp_path):
    from faircalib.calib import quantize
    from faircalib.calib.engine import FakeQuantLinear
    from faircalib.config import CalibConfig, RTNConfig

    model = hub.load(write_family(tmp_path / "llada", "llada"), dtype=torch.bfloat16)
    originals = {n: m.weight.detach().float().clone() for n, m in model.named_modules()
                 if n.endswith("q_proj")}  # fmt: skip
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    quantize(model, RTNConfig(group_size=32), tokens, CalibConfig(n_samples=2), progress=False)
    for name, w in originals.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, FakeQuantLinear) and layer.weight.dtype == torch.bfloat16
        assert layer.result.weight is layer.weight  # shared, not copied
        expected = quantize_rtn(w, QuantConfig(4, 32, False)).weight.to(torch.bfloat16)
        assert torch.equal(layer.weight, expected)


def test_fair_inputs_streamed_block_by_block_equal_the_resident_ones(model):
    """Frontier tracking (the sampler) and instability scoring (noise hooks) run through the
    block-streaming hooks give exactly the inputs and weights of the resident model."""
    from faircalib.calib.fair import fair_calibration_inputs

    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(2, model.vocab_size, (4, 32), generator=gen)
    cfg = FairCalibConfig(bits=4, group_size=32, steps=4, prefix_len=8, n_prompts=4)
    resident = fair_calibration_inputs(model, tokens, cfg, 0, "cpu")
    streamed = fair_calibration_inputs(model, tokens, cfg, 0, "cpu", stream=True)
    for a, b in zip(resident[:3], streamed[:3], strict=True):
        assert torch.equal(a, b)
    assert streamed[3]["placement"]["stream"] and not resident[3]["placement"]["stream"]
    assert resident[3]["mean_frontier_kl"] > 0  # the noise was really applied


def test_linears_sharing_an_input_share_one_summary_with_identical_statistics(
    tmp_path, monkeypatch
):
    """q/k/v (and gate/up) read one tensor: the engine summarises it once, and every
    accumulator ends exactly where feeding it alone (the plain `add`) leaves it."""
    from faircalib.calib.dataparallel import collect_stats
    from faircalib.quant.stats import LayerInputsAccumulator

    model = hub.load(write_family(tmp_path / "llada", "llada"))
    block, linears = model.blocks[0], model.quantizable_linears(model.blocks[0])
    x = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h, ctx = model.stem(x, None)
    weights = torch.rand(4, 24, generator=torch.Generator().manual_seed(1))
    batches = [slice(0, 2), slice(2, 4)]
    cache, contexts = [h[:2], h[2:]], [ctx.select(slice(0, 2)), ctx.select(slice(2, 4))]

    def fresh():
        return {n: LayerInputsAccumulator(lin.in_features, 16, 7, "cpu") for n, lin in linears}

    calls = []
    summarise = LayerInputsAccumulator.summarise
    monkeypatch.setattr(
        LayerInputsAccumulator, "summarise", lambda s, *a: calls.append(1) or summarise(s, *a)
    )
    shared = fresh()
    with torch.no_grad():
        collect_stats(block, linears, shared, cache, contexts, weights, batches, "cpu", 2)
    assert len(calls) < 2 * len(linears)  # some inputs were summarised once for several linears
    reference, seen = fresh(), {}  # each linear's own inputs, fed through its own `add`
    hooks = [lin.register_forward_pre_hook(lambda _m, a, n=n: seen.setdefault(n, []).append(a[0]))
             for n, lin in linears]  # fmt: skip
    with torch.no_grad():
        for j, sl in enumerate(batches):
            seen.clear()
            block(cache[j], contexts[j])
            for n, _ in linears:
                reference[n].add(seen[n][0], weights[sl])
    for hk in hooks:
        hk.remove()
    for n, _ in linears:
        a, b = shared[n].finish(), reference[n].finish()
        assert torch.equal(a.hessian, b.hessian) and torch.equal(a.sample, b.sample), n
        assert torch.equal(a.act_absmax, b.act_absmax) and a.n_rows == b.n_rows, n


def test_noise_inside_streaming_leaves_no_block_tensor_on_the_device(model, monkeypatch):
    """On a GPU each streamed block's tensors are copies; after a noisy forward every tensor
    must point at its own (CPU) storage again, not at the dropped device copy. A copy that
    stays would keep every block's linears on the device: the whole model, at 8B an OOM.
    Simulated here with clones standing in for the device copies."""
    x, t = batch(model, seed=3)
    cfg = FairCalibConfig(bits=4, group_size=32)
    homes = {k: v.data_ptr() for k, v in model.state_dict(keep_vars=True).items()}

    def clone_to_device(block, device):
        saved = []
        for store, name, tensor in streaming._tensors(block):
            saved.append((store, name, tensor.data))
            tensor.data = tensor.data.clone()  # a "device" copy: new storage
        return saved

    monkeypatch.setattr(streaming, "_to_device", clone_to_device)
    with torch.no_grad(), quantization_noise(model, weight_noise(cfg, 0)):
        expected = model.log_probs(x, t)  # the resident noisy forward
    with torch.no_grad(), on_device(model, "cpu", stream=True):
        with quantization_noise(model, weight_noise(cfg, 0)):
            noisy = model.log_probs(x, t)
        moved = [k for k, v in model.state_dict(keep_vars=True).items() if v.data_ptr() != homes[k]]
        assert not moved, moved[:3]
        clean = model.log_probs(x, t)
    assert torch.equal(noisy, expected) and not torch.equal(clean, noisy)
    assert {k: v.data_ptr() for k, v in model.state_dict(keep_vars=True).items()} == homes


def test_a_moved_quantized_layer_keeps_one_weight_copy():
    """`--offload` sends every quantized block back to the CPU: the layer's weight and its
    result's weight must stay one tensor there (at 8B a second copy is ~15 GiB of host memory).
    The meta device stands in for the other device."""
    from faircalib.calib.engine import FakeQuantLinear

    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    result = quantize_rtn(w, QuantConfig(4, 32, False))
    layer = FakeQuantLinear.from_result(result, torch.zeros(8), torch.bfloat16)
    layer.to("meta")
    assert layer.weight.is_meta and layer.result.codes.is_meta
    assert layer.result.weight is layer.weight
    assert layer.result.codes.dtype == torch.uint8  # dtypes kept
