"""The English and Chinese READMEs carry the same facts, and the settings table is complete."""

from __future__ import annotations

import re
from pathlib import Path

from graphinfer.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
ENGLISH = (ROOT / "README.md").read_text(encoding="utf-8")
CHINESE = (ROOT / "README.zh-CN.md").read_text(encoding="utf-8")


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.DOTALL)


def inline_names(text: str, pattern: str) -> set[str]:
    return set(re.findall(pattern, text))


def test_readmes_share_code_blocks() -> None:
    assert code_blocks(ENGLISH) == code_blocks(CHINESE)


def test_readmes_share_setting_names() -> None:
    pattern = r"GRAPHINFER_[A-Z0-9_]+|\bDB_URL\b|\bMODEL_PATHS\b|\bOFFLINE_TASK_SCHEDULE\b"
    assert inline_names(ENGLISH, pattern) == inline_names(CHINESE, pattern)


def test_readmes_share_commands_and_endpoints() -> None:
    pattern = r"`(?:graphinfer [^`]+|make [a-z]+)`|(?:GET|POST) /[a-z0-9/{}_]+"
    assert inline_names(ENGLISH, pattern) == inline_names(CHINESE, pattern)


def test_readmes_share_figures() -> None:
    pattern = r"\b\d+(?:[.,]\d+)*\b"
    assert sorted(re.findall(pattern, ENGLISH)) == sorted(re.findall(pattern, CHINESE))


def test_settings_table_lists_every_setting() -> None:
    documented = set(re.findall(r"GRAPHINFER_[A-Z0-9_]+", ENGLISH))
    for name in Settings.model_fields:
        variable = f"GRAPHINFER_{name.upper()}"
        # Grouped rows list related settings as GRAPHINFER_X_MIN_SIZE, `_MAX_SIZE`.
        group = variable.rsplit("_", 2)[0]
        assert variable in documented or any(item.startswith(group) for item in documented), variable
