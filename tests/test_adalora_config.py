"""AdaLoraConfig: PEFT's field names and JSON, and clear errors for schedules that cannot work."""

from __future__ import annotations

import json

import peft
import pytest

from peftkit import AdaLoraConfig, PeftConfig
from peftkit.config import config_from_dict

GOOD = dict(target_modules=["q_proj"], init_r=12, target_r=4, total_step=100, tinit=10, tfinal=20)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(total_step=None), "needs total_step"),
        (dict(total_step=0), "needs total_step"),
        (dict(tinit=60, tfinal=40), "tinit \\+ tfinal = 60 \\+ 40 >= total_step=100"),
        (dict(tinit=80, tfinal=30), "no steps are left for rank allocation"),
        (dict(target_r=16), "target_r=16 > init_r=12"),
        (dict(init_r=0), "init_r must be a positive integer"),
        (dict(deltaT=0), "deltaT must be a positive integer"),
        (dict(tinit=-1), "tinit must be a non-negative integer"),
        (dict(beta1=1.0), "beta1 must be in \\(0, 1\\)"),
        (dict(beta2=0.0), "beta2 must be in \\(0, 1\\)"),
        (dict(orth_reg_weight=-0.1), "orth_reg_weight must be >= 0"),
        (dict(use_rslora=True), "use_rslora=False"),
        (dict(lora_dropout=1.5), "lora_dropout"),
    ],
)
def test_configs_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        AdaLoraConfig(**{**GOOD, **overrides})


def test_r_is_ignored_with_a_warning():
    with pytest.warns(UserWarning, match="ignores r=4"):
        AdaLoraConfig(**GOOD, r=4)


def test_peft_reads_our_config_and_we_read_peft_config(tmp_path):
    ours = AdaLoraConfig(**GOOD, deltaT=5, beta1=0.8, orth_reg_weight=0.1, task_type="CAUSAL_LM")
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftConfig.from_pretrained(tmp_path / "ours")
    assert isinstance(theirs, peft.AdaLoraConfig)
    for field in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2"):
        assert getattr(theirs, field) == getattr(ours, field), field
    assert theirs.orth_reg_weight == 0.1 and theirs.total_step == 100

    peft_cfg = peft.AdaLoraConfig(**GOOD, deltaT=3, beta2=0.7, task_type="CAUSAL_LM")
    peft_cfg.rank_pattern = {"model.layers.0.self_attn.q_proj.lora_E": [True, False]}
    peft_cfg.save_pretrained(tmp_path / "theirs")
    data = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    back = config_from_dict(data)
    assert isinstance(back, AdaLoraConfig)
    assert (back.deltaT, back.beta2, back.total_step) == (3, 0.7, 100)
    assert back.rank_pattern == peft_cfg.rank_pattern
    assert back.target_modules == ["q_proj"]


def test_json_round_trip_keeps_every_field(tmp_path):
    cfg = AdaLoraConfig(**GOOD, rank_pattern={"a.lora_E": [True, False, True]})
    cfg.save_pretrained(tmp_path)
    back = PeftConfig.from_pretrained(tmp_path)
    assert back == cfg
