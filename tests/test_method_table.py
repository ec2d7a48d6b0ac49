"""The method table: methods declare what they can do, and the run asks the table."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest

from peftkit.config import Adapts, ModelFamily, PeftConfig, config_class
from peftkit.methods import table
from peftkit.methods.table import METHODS, Method, check_serves
from peftkit.tasks import TASK_TYPES
from peftkit.train.config import ConfigError, load_config


def test_every_config_class_declares_what_it_can_do():
    for row in METHODS.values():
        assert isinstance(row.config.adapts, Adapts), row.name
        assert row.config.model_families and all(
            isinstance(f, ModelFamily) for f in row.config.model_families
        ), row.name
        assert config_class(row.config.peft_type) is row.config
    assert not hasattr(PeftConfig, "adapts")  # no default: a new method must say it


def test_capabilities_of_the_built_in_methods():
    kinds = {name: row.config.adapts for name, row in METHODS.items()}
    assert kinds == {
        "lora": Adapts.LAYERS,
        "qlora": Adapts.LAYERS,
        "adalora": Adapts.LAYERS,
        "prompt_tuning": Adapts.INPUT_EMBEDDINGS,
        "p_tuning": Adapts.INPUT_EMBEDDINGS,
        "prefix_tuning": Adapts.KV_PREFIX,
        "loha": Adapts.LAYERS,
        "lokr": Adapts.LAYERS,
        "ia3": Adapts.LAYERS,
    }
    serving = {f: [m.name for m in METHODS.values() if m.serves(f)] for f in ModelFamily}
    assert serving[ModelFamily.TEXT] == list(METHODS)
    assert serving[ModelFamily.VISION] == ["lora", "qlora", "adalora", "loha", "lokr", "ia3"]
    # no 4-bit UNet loader
    assert serving[ModelFamily.DIFFUSION] == ["lora", "adalora", "loha", "lokr", "ia3"]


def test_every_task_row_names_a_family_some_method_serves():
    for name, row in TASK_TYPES.items():
        assert any(m.serves(row.family) for m in METHODS.values()), name


@pytest.mark.parametrize(
    ("name", "family", "why"),
    [
        ("prompt_tuning", "vision", "input embeddings"),
        ("prefix_tuning", "diffusion", "attention cache"),
        ("qlora", "diffusion", "4 bits"),
    ],
)
def test_refusals_say_why_and_list_the_methods_that_apply(name, family, why):
    with pytest.raises(ValueError) as info:
        check_serves(name, "some_task", family)
    text = str(info.value)
    said, _, choices = text.partition("Use one of ")
    assert name in said and why in said and "some_task" in said
    expected = [m.name for m in METHODS.values() if m.serves(family)]
    assert [c.split(" ")[0] for c in _top_level(choices)] == expected
    check_serves("lora", "some_task", family)  # LoRA serves every family


def _top_level(choices: str) -> list[str]:
    """Split ``"a (x, y), b"`` at the commas outside parentheses."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(choices):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            out.append(choices[start:i].strip())
            start = i + 1
    return [*out, choices[start:].strip()]


def test_a_new_method_is_one_row(tmp_path, monkeypatch):
    # a row added to the table is a method.type the run accepts, with its config class's fields
    # checked, and it shows up in the choices of errors: nothing else keeps a list
    @dataclasses.dataclass
    class WideLoraConfig(table.LoraConfig):
        pass

    row = Method("wide_lora", WideLoraConfig, table.InjectedAdapterModel)
    monkeypatch.setitem(METHODS, row.name, row)
    data = tmp_path / "train.csv"
    data.write_text("text,label\na,b\n")
    config = tmp_path / "run.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            model: {{name: m}}
            task: {{type: seq_cls, text: "{{text}}"}}
            data: {{train: {data}}}
            method: {{type: wide_lora, r: 4, no_such_field: 1}}
            """
        )
    )
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert any("method.no_such_field" in p for p in info.value.problems)
    config.write_text(config.read_text().replace(", no_such_field: 1", ""))
    method = load_config(config).method
    assert method["type"] == "wide_lora" and method["r"] == 4
    with pytest.raises(ValueError, match="wide_lora"):
        check_serves("prompt_tuning", "image_cls", "vision")
