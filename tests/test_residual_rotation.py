"""QuaRot's offline residual-stream rotation (`calib.residual_rotation`) on LLaDA and Dream:
exactness against the unrotated model, the rotated stream against a dense Q, tied output
layers, what stays online, MDLM unchanged, and the quarot CLI path with its save/load."""

import contextlib
import copy
import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import faircalib.models.llama_like as llama_like
from faircalib import hub
from faircalib.calib.activations import (
    ActCalibConfig,
    ActQuantLinear,
    quantize_activations,
    quantize_activations_model,
    rotate_model,
)
from faircalib.calib.fakequant_io import save_quantized
from faircalib.calib.inputs import masked_inputs
from faircalib.calib.residual_rotation import fold_residual_rotation, reads_rotated_stream
from faircalib.cli import main
from faircalib.config import CalibConfig
from faircalib.data import calibration_batch
from faircalib.data.sources import load_source
from faircalib.errors import ConfigError
from faircalib.models import Dream, LLaDA
from faircalib.quant.rotation import fold_input_rotation, random_hadamard
from llama_like_ckpt import MASK_ID, dream_config, llada_config, write_family

torch.set_num_threads(1)

FAMILIES = {"llada": (LLaDA, llada_config), "dream": (Dream, dream_config)}
# linears reading the residual stream (no online rotation after the fold), and the others
READERS = {
    "llada": ("q_proj", "k_proj", "v_proj", "ff_proj", "up_proj"),
    "dream": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj")
    + ("mlp.up_proj",),
}
ONLINE = {"llada": ("attn_out", "ff_out"), "dream": ("self_attn.o_proj", "mlp.down_proj")}


def random_model(family: str, seed: int = 0, **config) -> nn.Module:
    """A float64 model with random weights and norm scales away from 1 (so folding them
    matters)."""
    cls, make_config = FAMILIES[family]
    model = cls.from_config(make_config(**config)).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            is_norm = p.ndim == 1 and "norm" in name or name.endswith("ln_f.weight")
            p.copy_(1 + 0.2 * noise if is_norm else noise * (1.0 if p.shape[0] == 264 else 0.1))
    return model.eval()


@pytest.fixture
def exact(monkeypatch):
    """Run the norms and the output in the model's dtype: upstream normalises in float32 and
    SUBS returns float32, which would cap a float64 comparison at ~1e-6. Same math."""

    def rms_norm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    monkeypatch.setattr(llama_like.RMSNorm, "forward", rms_norm)
    monkeypatch.setattr(llama_like, "subs_log_probs", lambda logits, x, m: logits.log_softmax(-1))


def tokens(seed: int = 0, batch: int = 2, seq: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (batch, seq), generator=g)
    return torch.where(torch.rand(batch, seq, generator=g) < 0.5, MASK_ID, x)


def stream(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream after the stem and after every block."""
    h, ctx = model.stem(x, None)
    out = [h]
    for block in model.blocks:
        h = block(h, ctx)
        out.append(h)
    return out


def norm_scales(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, llama_like.RMSNorm)]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_fold_keeps_log_probs_and_rotates_the_stream(exact, family, tied):
    tie_key = FAMILIES[family][0].TIE_KEY
    model = random_model(family, **{tie_key: tied})
    folded = copy.deepcopy(model)
    result = fold_residual_rotation(folded, seed=5)
    x = tokens()
    with torch.no_grad():
        ref, got = model.log_probs(x), folded.log_probs(x)
        assert (ref - got).abs().max() < 1e-10  # the reference: the unrotated model
        assert (ref - model.log_probs(tokens(1))).abs().max() > 1e-2  # inputs matter
        # the stream itself is rotated: h -> h Q, Q as a dense matrix (no FWHT involved)
        q = random_hadamard(64, seed=5).matrix()
        for h, h_rot in zip(stream(model, x), stream(folded, x), strict=True):
            assert (h @ q - h_rot).abs().max() < 1e-10
            assert (h - h_rot).abs().max() > 1e-2
    assert all(torch.equal(g, torch.ones_like(g)) for g in norm_scales(folded))
    assert any((g - 1).abs().max() > 0.1 for g in norm_scales(model))
    assert result.folded and result.readers == 2 * 5 + 1 and result.writers == 2 * 2
    # random norms: a tied output layer cannot absorb the final norm's scale, so it is untied
    assert result.untied_head == tied and not folded.spec.tie_embeddings
    assert folded.config_dict()[tie_key] is False


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_tied_head_stays_tied_when_the_final_norm_is_constant(exact, family):
    tie_key = FAMILIES[family][0].TIE_KEY
    model = random_model(family, **{tie_key: True})
    final = model.get_submodule(model.NAMES.final_norm).weight
    with torch.no_grad():
        final.fill_(0.75)  # c I commutes with Q: the tied matrix E Q serves both uses
    folded = copy.deepcopy(model)
    result = fold_residual_rotation(folded, seed=2)
    assert not result.untied_head and folded.spec.tie_embeddings
    assert folded.config_dict()[tie_key] is True
    assert not hasattr(folded.get_submodule(model.NAMES.final_norm.rpartition(".")[0]), "ff_out")
    x = tokens(2)
    with torch.no_grad():
        assert (model.log_probs(x) - folded.log_probs(x)).abs().max() < 1e-10
    embed = folded.get_submodule(model.NAMES.embed).weight
    original = model.get_submodule(model.NAMES.embed).weight
    q = random_hadamard(64, seed=2).matrix()
    assert (original @ q - embed).abs().max() < 1e-12


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_rotate_model_runs_online_only_where_the_stream_is_not_read(exact, family):
    model = random_model(family, seed=3)
    rotated = rotate_model(copy.deepcopy(model), seed=4)
    for block in rotated.blocks:
        for name in READERS[family]:
            module = block.get_submodule(name)
            assert isinstance(module, ActQuantLinear) and module.rotation is None
        for name in ONLINE[family]:
            module = block.get_submodule(name)
            assert isinstance(module, ActQuantLinear) and module.rotation is not None
    x = tokens(3)
    with torch.no_grad():
        assert (model.log_probs(x) - rotated.log_probs(x)).abs().max() < 1e-10
    online = rotate_model(copy.deepcopy(model), seed=4, fold_residual=False)
    assert all(m.rotation is not None for m in online.modules() if isinstance(m, ActQuantLinear))


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_a_bf16_checkpoint_keeps_its_precision(tmp_path: Path, family):
    """Calibrated in float32 from bf16 weights: every folded tensor is rounded back to bf16,
    so the directory saved in bf16 is the model that was calibrated."""
    model = hub.load(write_family(tmp_path / family, family))
    folded = copy.deepcopy(model)
    fold_residual_rotation(folded, seed=0)
    unchanged = set()
    for (name, before), after in zip(
        model.state_dict().items(), folded.state_dict().values(), strict=True
    ):
        assert after.dtype == torch.float32
        assert torch.equal(after, after.bfloat16().float()), name
        if torch.equal(before, after):
            unchanged.add(name)
    # every tensor is folded but the readers' biases (Dream's q/k/v: outside the stream)
    assert all(name.endswith("_proj.bias") for name in unchanged)
    assert len(unchanged) == (3 * 2 if family == "dream" else 0)
    full = copy.deepcopy(model)
    fold_residual_rotation(full, seed=0, keep_precision=False)
    x = tokens(4)
    with torch.no_grad():
        ref, lp_full, lp_bf16 = (m.log_probs(x) for m in (model, full, folded))
    finite = torch.isfinite(ref)
    assert (ref[finite] - lp_full[finite]).abs().max() < 1e-4  # float32 rounding only
    assert (ref[finite] - lp_bf16[finite]).abs().max() < 0.1  # plus bf16 weight rounding


def test_a_model_already_quantized_is_refused_untouched():
    model = rotate_model(random_model("llada", weight_tying=True), fold_residual=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="not a float nn.Linear") as err:
        fold_residual_rotation(model)
    assert "\n" not in str(err.value) and model.spec.tie_embeddings  # not untied either
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def old_rotate_model(model, seed: int = 0):
    """`rotate_model` as it was before the residual fold (the MDLM reference)."""
    for i, block in enumerate(model.blocks):
        for j, (name, lin) in enumerate(model.quantizable_linears(block)):
            rot = random_hadamard(lin.in_features, seed=seed + 1000 * i + j)
            w = fold_input_rotation(lin.weight.detach(), rot)
            parent, _, child = name.rpartition(".")
            target = block.get_submodule(parent) if parent else block
            setattr(target, child, ActQuantLinear(w, lin.bias, None, rotation=rot))
    return model


def test_mdlm_cannot_fold_and_keeps_todays_rotations():
    model = hub.load("mdlm-tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fold_residual_rotation(model, seed=1)
    assert not result.folded and "mdlm" in result.reason
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(reads_rotated_stream(m) for m in model.modules())
    new, old = rotate_model(copy.deepcopy(model), seed=1), old_rotate_model(copy.deepcopy(model), 1)
    new_layers = {n: m for n, m in new.named_modules() if isinstance(m, ActQuantLinear)}
    old_layers = {n: m for n, m in old.named_modules() if isinstance(m, ActQuantLinear)}
    assert new_layers.keys() == old_layers.keys() and len(new_layers) == 16
    for name, m in new_layers.items():
        assert torch.equal(m.weight, old_layers[name].weight)
        assert torch.equal(m.rotation.signs, old_layers[name].rotation.signs)
    x = torch.randint(0, model.vocab_size - 1, (2, 16))
    with torch.no_grad():
        assert torch.equal(new.log_probs(x), old.log_probs(x))


def calib_file(directory: Path) -> Path:
    path = directory / "calib.txt"
    path.write_text("\n\n".join(f"Note {i}: the river bends past mill {i}." for i in range(30)))
    return path


@pytest.mark.parametrize(("family", "tied"), [("llada", False), ("dream", True)])
def test_quarot_cli_folds_and_reloads_bit_exactly(tmp_path: Path, family, tied):
    tie_key = FAMILIES[family][0].TIE_KEY
    src = write_family(tmp_path / "src", family, **{tie_key: tied})
    calib = calib_file(tmp_path)
    argv = ["quantize", str(src), "--scheme", "w4a4", "--method", "quarot", "--nsamples", "4"]
    argv += ["--seq-len", "32", "--calib", str(calib), "--out", str(tmp_path / "q"), "--json"]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(argv) == 0, err.getvalue()
    record = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert record["residual_rotation"]["folded"] and record["residual_rotation"]["seed"] == 0
    assert record["residual_rotation"]["untied_head"] == tied
    # independent reference: the library on the same texts, folded then quantized in memory
    ref = hub.load(src)
    tok = hub.load_tokenizer(src)
    texts = calibration_batch(tok, load_source(str(calib), None, "text"), None, 4, 32, 0)
    x_c, t_c = masked_inputs(ref, texts, CalibConfig(n_samples=4, seq_len=32))
    fold_residual_rotation(ref, seed=0)
    quantize_activations_model(ref, x_c, t_c, ActCalibConfig("w4a4", "quarot"))
    loaded = hub.load(tmp_path / "q")
    x = tokens(5, seq=32)
    with torch.no_grad():
        assert torch.equal(loaded.log_probs(x), ref.log_probs(x))
        assert not torch.equal(loaded.log_probs(x), hub.load(src).log_probs(x))
    assert json.loads((tmp_path / "q" / "config.json").read_text())[tie_key] is False
    assert all(torch.equal(g, torch.ones_like(g)) for g in norm_scales(loaded))
    for block in loaded.blocks:
        assert all(block.get_submodule(n).rotation is None for n in READERS[family])
        assert all(block.get_submodule(n).rotation is not None for n in ONLINE[family])


def test_in_memory_quarot_model_equals_the_reloaded_one(tmp_path: Path):
    src = write_family(tmp_path / "src", "llada", weight_tying=True)
    model = hub.load(src)
    texts = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = ActCalibConfig("w4a4", "quarot")
    report = quantize_activations(model, texts, cfg, CalibConfig(n_samples=4, seq_len=32))
    assert report["residual_rotation"]["untied_head"]
    x = tokens(6, seq=32)
    with torch.no_grad():
        in_memory = model.log_probs(x)
    save_quantized(model, report, tmp_path / "q", None, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(hub.load(tmp_path / "q").log_probs(x), in_memory)
