"""Fixtures shared by every test: the tiny model is built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from disagg.engine.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A seeded random-weight Llama directory (a few MB; built in seconds)."""
    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The project's shared/ folder beside the repository (CRD schemas and notes)."""
    return Path(__file__).resolve().parents[2] / "shared"
