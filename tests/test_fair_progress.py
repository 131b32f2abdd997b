"""Every long stage of FAIR-Calib shows a progress bar named after what runs (issue 20)."""

import torch

from faircalib import hub
from faircalib.calib import quantize
from faircalib.config import CalibConfig, FairCalibConfig, ReconConfig


def test_fair_stages_have_named_progress_bars(capsys):
    model = hub.load("mdlm-tiny")
    tokens = torch.randint(2, model.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    stage2 = ReconConfig(steps=2, e2e_steps=2, eval_every=1)
    cfg = FairCalibConfig(group_size=32, steps=4, prefix_len=8, n_prompts=4, recon=stage2)
    quantize(model, cfg, tokens, CalibConfig(n_samples=4, seq_len=32), progress=True)
    err = capsys.readouterr().err
    for name in (
        "FAIR-Calib frontier tracking",
        "FAIR-Calib instability scoring",
        "weighted gptq + recon",
        "FAIR-Calib end-to-end scales",
    ):
        assert name in err, name


def test_no_progress_output_when_asked_for_none(capsys):
    model = hub.load("mdlm-tiny")
    tokens = torch.randint(2, model.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = FairCalibConfig(group_size=32, steps=4, prefix_len=8, n_prompts=4, preset="fast")
    quantize(model, cfg, tokens, CalibConfig(n_samples=4, seq_len=32), progress=False)
    assert "FAIR-Calib" not in capsys.readouterr().err
