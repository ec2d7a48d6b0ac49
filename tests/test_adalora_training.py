"""AdaLoRA training duties: the orthogonality penalty, the budget schedule, masking, the frozen
final pattern, and the warning when ``update_and_allocate`` is forgotten."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch

from conftest import logits_of
from peftkit import AdaLoraConfig, PeftModel, get_peft_model
from peftkit.methods.rank_allocator import RankAllocator

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _model(tiny_model, **kw):
    base, inputs = tiny_model("llama")
    cfg = dict(
        task_type="CAUSAL_LM",
        target_modules=TARGETS,
        init_r=6,
        target_r=2,
        total_step=10,
        tinit=2,
        tfinal=3,
        deltaT=2,
    )
    model = get_peft_model(base, AdaLoraConfig(**{**cfg, **kw}))
    return model, {**inputs, "labels": inputs["input_ids"]}


def test_orthogonality_penalty_is_added_in_training_only(tiny_model):
    model, batch = _model(tiny_model, init_lora_weights=False, orth_reg_weight=0.3)
    plain = model.base_model.model  # the transformers model, without the penalty
    with torch.no_grad():
        model.train()
        own = plain(**batch).loss
        penalised = model(**batch).loss
        terms = []
        for _, layer in model.base_model.adapter_layers():
            A, _, B = layer.triplet("default")
            terms.append(torch.linalg.norm(A @ A.T - torch.eye(A.shape[0])))  # ‖AAᵀ − I‖_F
            terms.append(torch.linalg.norm(B.T @ B - torch.eye(B.shape[1])))  # ‖BᵀB − I‖_F
        expected = own + 0.3 * torch.stack(terms).mean()
        torch.testing.assert_close(penalised, expected)
        assert penalised > own
        model.eval()
        torch.testing.assert_close(model(**batch).loss, plain(**batch).loss)


def test_budget_schedule_matches_peft(tiny_model):
    model, _ = _model(tiny_model, total_step=50, tinit=5, tfinal=10, deltaT=3)
    base, _ = tiny_model("llama")
    theirs = peft.get_peft_model(
        base,
        peft.AdaLoraConfig(
            target_modules=TARGETS,
            init_r=6,
            target_r=2,
            total_step=50,
            tinit=5,
            tfinal=10,
            deltaT=3,
        ),
    )
    ours_alloc, peft_alloc = model.base_model.rank_allocator, theirs.base_model.rankallocator
    assert ours_alloc.init_budget == peft_alloc.init_bgt == 6 * 6
    assert ours_alloc.target_budget == peft_alloc.target_bgt == 2 * 6
    schedule = [ours_alloc.budget_schedule(s) for s in range(0, 55)]
    assert schedule == [peft_alloc.budget_schedule(s) for s in range(0, 55)]
    assert schedule[5] == (36, False) and schedule[41] == (12, True)  # warm-up / final phase
    budgets = [b for b, _ in schedule[5:41]]
    assert budgets == sorted(budgets, reverse=True) and budgets[-1] == 12  # cubic decay to target


class _Cfg:
    tinit, tfinal, total_step, deltaT, beta1, beta2, target_r = 0, 0, 10, 1, 0.5, 0.5, 1


def test_allocator_masks_the_lowest_scores_and_ema_is_the_papers():
    torch.manual_seed(0)
    triplets = {
        name: tuple(torch.nn.Parameter(torch.randn(*s)) for s in ((3, 4), (3, 1), (5, 3)))
        for name in ("a", "b")
    }
    for A, E, B in triplets.values():
        for p in (A, E, B):
            p.grad = torch.randn_like(p)
    alloc = RankAllocator(_Cfg(), triplets, adapter_name="x")
    alloc.update_ipt(triplets)
    A, E, B = triplets["a"]
    ipt = (E * E.grad).abs()
    torch.testing.assert_close(alloc.sensitivity[("a", "E")], 0.5 * ipt)  # β1 Ī + (1-β1) I
    torch.testing.assert_close(alloc.uncertainty[("a", "E")], 0.5 * (ipt - 0.5 * ipt).abs())

    scores = alloc.triplet_scores(triplets)
    s = lambda f, p: (0.5 * (p * p.grad).abs()) * (0.25 * (p * p.grad).abs())  # noqa: E731
    manual = s("E", E).view(-1) + s("A", A).mean(1) + s("B", B).mean(0)
    torch.testing.assert_close(scores["a"], manual)

    E_before = {k: t[1].detach().clone() for k, t in triplets.items()}
    pattern = alloc.mask_to_budget(triplets, budget=4)  # keep 4 of 6 triplets
    flat = torch.cat([scores["a"], scores["b"]])
    keep_expected = flat > flat.sort().values[1]
    kept = torch.tensor(pattern["a.lora_E.x"] + pattern["b.lora_E.x"])  # PEFT's in-memory keys
    assert torch.equal(kept, keep_expected) and int(kept.sum()) == 4
    for name, (_, E, _) in triplets.items():
        mask = torch.tensor(pattern[f"{name}.lora_E.x"]).view(-1, 1)
        assert torch.equal(E.detach(), torch.where(mask, E_before[name], torch.zeros(())))
    assert alloc.mask_to_budget(triplets, budget=6) == {
        "a.lora_E.x": [True] * 3,
        "b.lora_E.x": [True] * 3,
    }  # full budget masks nothing


def _train(model, batch, steps, allocate="after", optimizer=None):
    opt = optimizer or torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for step in range(1, steps + 1):
        loss = model(**batch).loss
        loss.backward()
        if allocate == "before":
            model.base_model.update_and_allocate(step)
        opt.step()
        if allocate == "after":
            model.base_model.update_and_allocate(step)
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("kind", ["sgd", "adamw", "adamw-fused"])
def test_forgotten_update_and_allocate_warns_once(tiny_model, kind):
    model, batch = _model(tiny_model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = {
        "sgd": lambda: torch.optim.SGD(params, lr=0.1),
        "adamw": lambda: torch.optim.AdamW(params),
        "adamw-fused": lambda: torch.optim.AdamW(params, fused=True),
    }[kind]()
    with pytest.warns(UserWarning, match="without model.base_model.update_and_allocate") as rec:
        _train(model, batch, steps=6, allocate="never", optimizer=opt)
    assert sum("update_and_allocate" in str(w.message) for w in rec) == 1


@pytest.mark.parametrize("allocate", ["after", "before"])
def test_no_warning_when_allocation_runs(tiny_model, allocate):
    model, batch = _model(tiny_model)
    other = torch.nn.Linear(3, 3)  # an unrelated optimiser stepping in the same process
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for _ in range(3):
            other(torch.randn(2, 3)).sum().backward()
            other_opt.step()
        _train(model, batch, steps=4, allocate=allocate)


def test_allocation_without_gradients_is_a_clear_error(tiny_model):
    model, batch = _model(tiny_model)
    model.train()
    with pytest.raises(RuntimeError, match="before optimizer.zero_grad"):
        model.base_model.update_and_allocate(1)


@pytest.mark.parametrize("keys", ["peft", "old"])
def test_final_pattern_is_frozen_and_enforced(keys, tiny_model):
    model, batch = _model(tiny_model)  # total 10, tfinal 3: pattern frozen at step 7
    opt = _train(model, batch, steps=7)
    config = model.peft_config["default"]
    assert all(k.endswith(".lora_E.default") for k in config.rank_pattern)  # PEFT's keys
    if keys == "old":  # as older peftkit versions kept it (and resumed training states hold it)
        config.rank_pattern = {
            k.removesuffix(".default"): v for k, v in config.rank_pattern.items()
        }
    frozen = copy.deepcopy(config.rank_pattern)
    assert sum(sum(m) for m in frozen.values()) <= 2 * len(TARGETS) * 2
    for step in range(8, 12):  # later steps (even past total_step) keep the pattern
        model(**batch).loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()
        assert config.rank_pattern == frozen
        for path, (_, E, _) in model.base_model.triplets("default").items():
            keep = torch.tensor(frozen[path + ".lora_E" + (".default" if keys == "peft" else "")])
            assert (E[~keep] == 0).all() and (E[keep] != 0).all()


def test_loaded_adapter_keeps_training_at_its_saved_size(tiny_model, tmp_path):
    model, batch = _model(tiny_model)
    _train(model, batch, steps=8)
    model.save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(tiny_model("llama")[0], tmp_path)
    with pytest.raises(ValueError, match="is_trainable=True"):
        frozen.base_model.update_and_allocate(9)

    base, _ = tiny_model("llama")
    loaded = PeftModel.from_pretrained(base, tmp_path, is_trainable=True)
    pattern = loaded.peft_config["default"].rank_pattern
    ranks = {p: layer.r["default"] for p, layer in loaded.base_model.adapter_layers()}
    assert ranks == {k.removesuffix(".lora_E"): sum(v) for k, v in pattern.items()}
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits_of(loaded(**batch)), logits_of(model(**batch)))
    before = {k: v.clone() for k, v in loaded.state_dict().items() if "lora_A" in k}
    _train(loaded, batch, steps=2)
    after = {k: v for k, v in loaded.state_dict().items() if "lora_A" in k}
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].numel())
    assert {p: layer.r["default"] for p, layer in loaded.base_model.adapter_layers()} == ranks


def test_resumed_training_state_gives_the_same_allocation(tiny_model, tmp_path):
    """Save the trainer's method state mid-decay, restore it into a fresh model: same masks."""
    model, batch = _model(tiny_model, total_step=12, tinit=1, tfinal=3, deltaT=1)
    opt = _train(model, batch, steps=4)
    torch.save(model.base_model.training_state_dict(), tmp_path / "method_state.pt")
    trainable = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    opt_state = copy.deepcopy(opt.state_dict())

    twin, _ = _model(tiny_model, total_step=12, tinit=1, tfinal=3, deltaT=1)
    twin.load_state_dict(trainable, strict=False)
    twin_opt = torch.optim.SGD([p for p in twin.parameters() if p.requires_grad], lr=0.1)
    twin_opt.load_state_dict(opt_state)
    twin.base_model.load_training_state_dict(
        torch.load(tmp_path / "method_state.pt", weights_only=True)
    )
    assert twin.peft_config["default"].rank_pattern == model.peft_config["default"].rank_pattern
    for m, o in ((model, opt), (twin, twin_opt)):
        m.train()
        for step in range(5, 10):
            m(**batch).loss.backward()
            o.step()
            m.base_model.update_and_allocate(step)
            o.zero_grad()
    assert twin.peft_config["default"].rank_pattern == model.peft_config["default"].rank_pattern
    with pytest.raises(ValueError, match="resume with the same method config"):
        twin.base_model.load_training_state_dict({"adapter_name": "other"})
