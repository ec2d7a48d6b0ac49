"""Run configs: overrides, type checks, unknown keys, missing files, all reported together."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from peftkit.methods.table import METHODS
from peftkit.train.config import (
    ConfigError,
    apply_overrides,
    load_config,
    parse_overrides,
    resolve_path,
)
from peftkit.train.schema import coerce

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text,label\nhello,a\nbye,b\n", encoding="utf-8")
    return path


GOOD = """
model: {{name: some-org/some-model}}
task: {{type: causal_lm_cls, text: "{{text}} :", target: "{{label}}"}}
data: {{train: {train}}}
method: {{type: lora, r: 8, target_modules: [q_proj, v_proj]}}
lr: 3e-3
"""


def test_a_good_config_loads_with_defaults_and_yaml_1_1_floats(tmp_path, data_file):
    config = load_config(write(tmp_path, GOOD.format(train=data_file)))
    assert config.lr == pytest.approx(3e-3)  # PyYAML reads `3e-3` as a string
    assert config.method == {"type": "lora", "r": 8, "target_modules": ["q_proj", "v_proj"]}
    assert config.task["max_length"] == 256  # task defaults written out in the resolved config
    assert config.data.train.path == str(data_file)
    assert config.epochs == 3 and config.grad_accum == 1


def test_dropout_mask_defaults_to_peft_s_draw_and_names_the_choices(tmp_path, data_file):
    path = write(tmp_path, GOOD.format(train=data_file))
    assert load_config(path).dropout_mask == "bernoulli"
    assert load_config(path, ["dropout_mask=fast"]).dropout_mask == "fast"
    with pytest.raises(ConfigError, match="dropout_mask: 'coin' is not one of"):
        load_config(path, ["dropout_mask=coin"])


def test_trim_heap_defaults_to_auto_and_names_the_choices(tmp_path, data_file):
    path = write(tmp_path, GOOD.format(train=data_file))
    assert load_config(path).trim_heap == "auto"  # head, or blocks where weights are sharded
    assert load_config(path, ["trim_heap=blocks"]).trim_heap == "blocks"
    with pytest.raises(ConfigError, match="trim_heap: 'always' is not one of"):
        load_config(path, ["trim_heap=always"])


def test_dotted_overrides_reach_into_blocks(tmp_path, data_file):
    path = write(tmp_path, GOOD.format(train=data_file))
    config = load_config(
        path,
        [
            "method.r=16",
            "epochs=5",
            "lora.lora_alpha=32",
            "method.target_modules=[q_proj]",
            "data.train.limit=1",
            "max_grad_norm=null",
        ],
    )
    assert config.method["r"] == 16 and config.method["lora_alpha"] == 32.0
    assert config.method["target_modules"] == ["q_proj"]
    assert config.epochs == 5 and config.max_grad_norm is None
    assert config.data.train.limit == 1 and config.data.train.path == str(data_file)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["epochs"])
    assert apply_overrides({"a": {"b": 1}}, ["a.c=[1, 2]"]) == {"a": {"b": 1, "c": [1, 2]}}


def test_every_problem_is_reported_at_once_with_its_key_path(tmp_path):
    path = write(
        tmp_path,
        """
        model: {name: ./no/such/model, dtype: fp33}
        task: {type: causal_lm_cls, txt: "x"}
        data: {train: missing.csv, eval_size: ten}
        method: {type: lora, rank: 8, lora_alpha: big, task_type: CAUSAL_LM}
        epochs: three
        batch_sise: 4
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, ["seed=1.5"])
    problems = info.value.problems
    text = str(info.value)
    expected = [
        "model.dtype: 'fp33' is not one of",
        "task.txt: unknown key (did you mean 'text'?)",
        "task.text: required key is missing",
        "data.eval_size: expected int | float | null, got str 'ten'",
        "method.rank: unknown key",
        "method.lora_alpha: expected float, got str 'big'",
        "method.task_type: set by the run",
        "epochs: expected int, got str 'three'",
        "batch_sise: unknown key (did you mean 'batch_size'?)",
        "seed: expected int, got float 1.5",
        "data.train.path: file not found: missing.csv",
        "model.name: './no/such/model' looks like a local path",
    ]
    for fragment in expected:
        assert any(p.startswith(fragment) for p in problems), (fragment, problems)
    assert len(problems) == len(expected)
    assert text.startswith(f"config {path} has {len(expected)} problems:")


def test_unknown_task_and_method_types_list_the_choices(tmp_path, data_file):
    path = write(
        tmp_path,
        f"""
        model: {{name: m}}
        task: {{type: classify}}
        data: {{train: {data_file}}}
        method: {{type: boft}}
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    task_problem, method_problem = info.value.problems
    assert "task.type: 'classify' is unknown; use one of causal_lm" in task_problem
    assert "method.type: 'boft' is unknown; use one of lora, qlora, adalora" in method_problem


def test_missing_blocks_and_train_split(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "model: {name: m}\n"))
    problems = info.value.problems
    assert any(p.startswith("task: required block is missing") for p in problems)
    assert any(p.startswith("method: required block is missing") for p in problems)
    assert any(p.startswith("data.train: required to train") for p in problems)


def test_a_hub_fallback_excuses_a_missing_local_file(tmp_path):
    path = write(
        tmp_path,
        """
        model: {name: m}
        task: {type: seq_cls, text: "{sentence}"}
        data: {train: {path: nowhere.csv, hub: "glue:sst2@train"}}
        method: {type: lora, target_modules: [query]}
        """,
    )
    assert load_config(path).data.train.hub == "glue:sst2@train"


def test_qlora_means_lora_on_a_4bit_base(tmp_path, data_file):
    text = GOOD.format(train=data_file).replace("type: lora", "type: qlora")
    config = load_config(write(tmp_path, text))
    assert config.model.quantization == "nf4"
    assert config.method_type == "qlora"


def test_every_method_type_finds_its_config_class_in_the_method_table():
    # the trainer looks config classes up in the method table: a method that loses its row fails
    # here by name instead of vanishing from the choices
    assert {k: row.config.__name__ for k, row in METHODS.items()} == {
        "lora": "LoraConfig",
        "qlora": "LoraConfig",
        "adalora": "AdaLoraConfig",
        "prompt_tuning": "PromptTuningConfig",
        "p_tuning": "PromptEncoderConfig",
        "prefix_tuning": "PrefixTuningConfig",
        "loha": "LoHaConfig",
        "lokr": "LoKrConfig",
        "ia3": "IA3Config",
    }


def test_method_fields_are_checked_against_the_registry_class(tmp_path, data_file):
    text = GOOD.format(train=data_file).replace(
        "{type: lora, r: 8, target_modules: [q_proj, v_proj]}",
        "{type: adalora, init_r: 12, target_r: 4, tinit: two, target_modules: [q_proj]}",
    )
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.problems == ["method.tinit: expected int, got str 'two'"]


def test_paths_resolve_from_cwd_then_config_folder(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "local.csv").write_text("a\n1\n")
    monkeypatch.chdir(tmp_path)
    assert resolve_path("cfg/local.csv", None) == tmp_path / "cfg" / "local.csv"
    assert resolve_path("local.csv", str(tmp_path / "cfg")) == tmp_path / "cfg" / "local.csv"
    assert resolve_path("nope.csv", str(tmp_path / "cfg")) is None


def test_coerce_keeps_union_members_exact():
    problems: list[str] = []
    assert coerce(True, bool | str, "x", problems) is True
    assert coerce(3, int | float | None, "x", problems) == 3
    assert coerce("3.5", float, "x", problems) == 3.5
    assert problems == []
    coerce(True, int, "y", problems)
    assert problems == ["y: expected int, got bool True"]


def _home_paths(raw: dict) -> dict[str, str]:
    """``{key path: value}`` of a recipe's values under ``~/`` (what its ``prepare`` makes)."""
    found = {}
    model, task, data = raw["model"], raw["task"], raw.get("data") or {}
    if str(model["name"]).startswith("~/"):
        found["model.name"] = model["name"]
    found.update({f"task.{k}": v for k, v in task.items() if str(v).startswith("~/")})
    for split in ("train", "eval", "test"):
        value = data.get(split)
        value = value.get("path") if isinstance(value, dict) else value
        if str(value).startswith("~/"):
            found[f"data.{split}.path"] = value
    return found


@pytest.mark.parametrize("recipe", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_every_example_recipe_validates(recipe, monkeypatch, tmp_path):
    """Recipes name real files in ../shared/data (or a hub fallback) and valid fields, on a
    fresh machine (an empty HOME). A recipe whose base/data a command prepares under ``~``
    (``prepare: make t2i-digits``) fails there naming exactly those paths and that command,
    and validates once they exist."""
    monkeypatch.chdir(EXAMPLES.parent)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("PEFTKIT_CACHE_DIR", raising=False)
    raw = yaml.safe_load((EXAMPLES / recipe).read_text())
    home = _home_paths(raw)
    assert bool(home) == bool(raw.get("prepare")), "files under ~ need a `prepare` command"
    if home:
        with pytest.raises(ConfigError) as err:
            load_config(EXAMPLES / recipe)
        assert sorted(p.split(":")[0] for p in err.value.problems) == sorted(home)
        assert f"made by `{raw['prepare']}`" in str(err.value)
        assert err.value.hint and raw["prepare"] in err.value.hint
        for value in home.values():
            (tmp_path / value.removeprefix("~/")).mkdir(parents=True)
    config = load_config(EXAMPLES / recipe)
    assert config.method_type == raw["method"]["type"]
    assert config.prepare == raw.get("prepare")


def test_check_on_a_fresh_machine_names_the_prepare_command(monkeypatch, tmp_path, capsys):
    """`peftkit train RECIPE --check` (and a plain train) stop before any model loads, saying
    which command makes the missing base, judge and data."""
    from peftkit.cli import main

    monkeypatch.chdir(EXAMPLES.parent)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("PEFTKIT_CACHE_DIR", raising=False)
    for extra in (["--check"], [f"output_dir={tmp_path / 'run'}"]):
        assert main(["train", "examples/lora_t2i_digits_minilm.yaml", *extra]) == 2
        err = capsys.readouterr().err
        assert "made by `make t2i-digits`" in err
        for key in ("model.name", "task.classifier", "data.train.path", "data.eval.path"):
            assert key in err
    assert not (tmp_path / "run").exists()
