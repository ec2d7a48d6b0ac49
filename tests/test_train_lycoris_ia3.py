"""`peftkit train` with `method.type: ia3 | loha | lokr` end to end on tiny models: the run's
adapter is PEFT's (peft loads it with the same logits), `eval` re-scores it, and text_to_image
writes LoKr in diffusers' layout too (LoHa: the PEFT folder only, and the log says why)."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch

from peftkit.cli import main
from test_cli import assets, task_config, write_config  # noqa: F401 (the fixture)

RUNS = [
    ("causal_lm_cls", "ia3"),
    ("causal_lm_cls", "loha"),
    ("causal_lm_cls", "lokr"),
    ("seq_cls", "ia3"),
    ("seq_cls", "lokr"),
    ("seq2seq_t5", "ia3"),
]
PEFT_TYPES = {"ia3": "IA3", "loha": "LOHA", "lokr": "LOKR"}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(("task", "method"), RUNS)
def test_train_eval_and_peft_loads_the_run(assets, tmp_path, task, method, capsys):  # noqa: F811
    out = tmp_path / "run"
    cfg = task_config(assets, task, out, method=method, plots=False, batch_size=4, lr=3e-2)
    cfg["data"].pop("test", None)
    assert main(["train", str(write_config(tmp_path / "c.yaml", cfg))]) == 0
    summary = json.loads((out / "summary.json").read_text())
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == PEFT_TYPES[method] and summary["method"] == method
    assert summary["trainable_params"] > 0
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["eval_loss"] == pytest.approx(summary["eval"]["eval_loss"], rel=1e-4)

    # the trained adapter, loaded by PEFT on the same base, gives peftkit's logits
    from peftkit.train.inference import (
        find_target,
        load_for_inference,
        restore_task_state,
        run_config,
        spec_for,
    )

    target = find_target(out)
    config = run_config(target)
    spec = spec_for(config)
    spec = restore_task_state(spec, target) or spec
    ours = load_for_inference(target, config, spec).model
    base = load_for_inference(target, config, spec, use_adapter=False).model
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), out / "adapter").eval()
    ids = torch.tensor([[2, 10, 11, 12, 13, 14]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task.startswith("seq2seq"):
        inputs["decoder_input_ids"] = ids[:, :3]
    with torch.no_grad():
        a, b = ours(**inputs).logits, theirs(**inputs).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_an_unknown_method_lists_the_new_ones(assets, tmp_path, capsys):  # noqa: F811
    cfg = task_config(assets, "causal_lm_cls", tmp_path / "run")
    cfg["method"] = {"type": "lycoris"}
    assert main(["train", str(write_config(tmp_path / "c.yaml", cfg)), "--check"]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in ("loha", "lokr", "ia3"))
