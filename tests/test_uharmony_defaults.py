"""README and code agree on the methods' defaults (issue 18): every ``option`` (default) the README's U-Harmony
table names is ``UHarmonyConfig``'s default, and the Hermes section names ``HermesConfig``'s input and recipe
defaults."""
from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from nnharmony.trainers.hermes_trainer import HermesConfig
from nnharmony.trainers.uharmony_trainer import UHarmonyConfig

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"### {title}\n")
    return README[start: README.index("\n### ", start + 1)]


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def test_uharmony_readme_defaults_are_the_code_defaults():
    defaults = {f.name: f.default for f in fields(UHarmonyConfig)}
    table = "\n".join(line for line in _section("U-Harmony").splitlines() if line.startswith("|"))
    named = re.findall(r"`(\w+)` \(`?([\w.]+)`?\)", table)
    assert {"poly_order", "restoration", "gate_loss_weight", "inference_gate_mode"} <= {n for n, _ in named}
    for name, text in named:
        assert name in defaults, f"README names unknown U-Harmony option {name}"
        assert defaults[name] == _value(text), f"README: {name} ({text}); code: {defaults[name]!r}"


def test_hermes_readme_names_the_input_and_recipe_defaults():
    cfg, text = HermesConfig(), _section("Hermes")
    assert cfg.input_mode == "shared" and "`shared` (default" in text
    assert cfg.recipe == "nnunet" and "`nnunet` (default)" in text
