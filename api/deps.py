"""Dependency markers shared by the controllers."""

from __future__ import annotations

from typing import TypeAlias

from litestar.di import NamedDependency

from governance.service import StoryVault

__all__ = ["VaultDep"]

VaultDep: TypeAlias = NamedDependency[StoryVault]
