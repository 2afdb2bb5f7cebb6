"""The data catalog: data categories, the story parts they cover, and purposes.

The catalog is loaded once at start from the shipped TOML file (or the
operator's file named by STORYVAULT_CATALOG) and validated; a broken catalog
stops the start with a clear message.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "LEGAL_BASES",
    "Catalog",
    "CatalogError",
    "DataCategory",
    "LegalHold",
    "ProfileField",
    "Purpose",
    "load_catalog",
]

LEGAL_BASES = frozenset({"consent", "legitimate_interest", "contract", "legal_obligation"})
FIELD_TYPES = frozenset({"text", "email", "phone", "date"})
REQUIRED_CATEGORIES = frozenset(
    {
        "identity.name",
        "contact.email",
        "contact.phone",
        "contact.address",
        "demographic.birthday",
        "commerce.purchase",
        "commerce.invoice",
        "support.ticket",
        "engagement.interaction",
        "preference",
        "insight.sentiment",
        "insight.motivation",
    }
)
_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")
_FIELD = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


class CatalogError(Exception):
    """The catalog file is malformed; the message names the entry."""


@dataclass(frozen=True, slots=True)
class ProfileField:
    name: str
    type: str
    category: str


@dataclass(frozen=True, slots=True)
class LegalHold:
    """Data of this category survives erasure, readable only for ``purpose``."""

    purpose: str
    years: int


@dataclass(frozen=True, slots=True)
class DataCategory:
    name: str
    fideslang: str
    description: str
    profile_fields: tuple[ProfileField, ...] = ()
    chapter_kinds: tuple[str, ...] = ()
    retention_days: int = 0
    legal_hold: LegalHold | None = None

    @property
    def retention(self) -> timedelta | None:
        return timedelta(days=self.retention_days) if self.retention_days else None


@dataclass(frozen=True, slots=True)
class Purpose:
    name: str
    legal_basis: str
    fideslang: str
    description: str
    notice: str
    sale_or_sharing: bool = False
    max_age_days: int = 0
    notice_version: str = "1"

    @property
    def max_age(self) -> timedelta | None:
        return timedelta(days=self.max_age_days) if self.max_age_days else None

    @property
    def notice_id(self) -> str:
        return f"notice:{self.name}"

    @property
    def notice_sha256(self) -> str:
        return hashlib.sha256(self.notice.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Catalog:
    categories: Mapping[str, DataCategory]
    purposes: Mapping[str, Purpose]
    profile_fields: Mapping[str, ProfileField] = field(default_factory=dict)
    kind_to_category: Mapping[str, str] = field(default_factory=dict)
    digest: str = ""

    def category_for_kind(self, kind: str) -> str | None:
        return self.kind_to_category.get(kind)

    def held_categories(self) -> dict[str, LegalHold]:
        return {c.name: c.legal_hold for c in self.categories.values() if c.legal_hold}


def _str(entry: Mapping[str, Any], key: str, where: str, *, default: str | None = None) -> str:
    value = entry.get(key, default)
    if not isinstance(value, str) or not value.strip():
        raise CatalogError(f"{where}: '{key}' must be a non-empty string")
    return value


def _int(entry: Mapping[str, Any], key: str, where: str) -> int:
    value = entry.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CatalogError(f"{where}: '{key}' must be a whole number >= 0")
    return value


def _parse(data: Mapping[str, Any]) -> Catalog:
    categories: dict[str, DataCategory] = {}
    profile_fields: dict[str, ProfileField] = {}
    kinds: dict[str, str] = {}
    raw_categories = data.get("categories")
    raw_purposes = data.get("purposes")
    if not isinstance(raw_categories, list) or not isinstance(raw_purposes, list):
        raise CatalogError("the catalog needs [[categories]] and [[purposes]] tables")
    purposes: dict[str, Purpose] = {}
    for i, entry in enumerate(raw_purposes):
        where = f"purposes[{i}]"
        if not isinstance(entry, dict):
            raise CatalogError(f"{where}: must be a table")
        name = _str(entry, "name", where)
        if not _NAME.match(name):
            raise CatalogError(f"{where}: malformed purpose name {name!r}")
        if name in purposes:
            raise CatalogError(f"{where}: duplicate purpose {name!r}")
        basis = _str(entry, "legal_basis", where)
        if basis not in LEGAL_BASES:
            raise CatalogError(
                f"{where}: unknown legal basis {basis!r} (one of {', '.join(sorted(LEGAL_BASES))})"
            )
        sharing = entry.get("sale_or_sharing", False)
        if not isinstance(sharing, bool):
            raise CatalogError(f"{where}: 'sale_or_sharing' must be true or false")
        max_age = _int(entry, "max_age_days", where)
        if max_age and basis != "consent":
            raise CatalogError(f"{where}: only consent purposes may carry max_age_days")
        purposes[name] = Purpose(
            name=name,
            legal_basis=basis,
            fideslang=_str(entry, "fideslang", where),
            description=_str(entry, "description", where),
            notice=_str(entry, "notice", where),
            sale_or_sharing=sharing,
            max_age_days=max_age,
            notice_version=str(entry.get("notice_version", "1")),
        )
    for i, entry in enumerate(raw_categories):
        where = f"categories[{i}]"
        if not isinstance(entry, dict):
            raise CatalogError(f"{where}: must be a table")
        name = _str(entry, "name", where)
        if not _NAME.match(name):
            raise CatalogError(f"{where}: malformed category name {name!r}")
        if name in categories:
            raise CatalogError(f"{where}: duplicate category {name!r}")
        fields: list[ProfileField] = []
        for j, raw_field in enumerate(entry.get("profile_fields", [])):
            fwhere = f"{where}.profile_fields[{j}]"
            if not isinstance(raw_field, dict):
                raise CatalogError(f"{fwhere}: must be a table")
            fname = _str(raw_field, "name", fwhere)
            ftype = _str(raw_field, "type", fwhere, default="text")
            if not _FIELD.match(fname):
                raise CatalogError(f"{fwhere}: malformed field name {fname!r}")
            if ftype not in FIELD_TYPES:
                raise CatalogError(f"{fwhere}: unknown field type {ftype!r}")
            if fname in profile_fields:
                raise CatalogError(f"{fwhere}: duplicate profile field {fname!r}")
            pf = ProfileField(name=fname, type=ftype, category=name)
            profile_fields[fname] = pf
            fields.append(pf)
        chapter_kinds = entry.get("chapter_kinds", [])
        if not isinstance(chapter_kinds, list) or not all(
            isinstance(k, str) and _FIELD.match(k) for k in chapter_kinds
        ):
            raise CatalogError(f"{where}: 'chapter_kinds' must be a list of simple names")
        for kind in chapter_kinds:
            if kind in kinds:
                raise CatalogError(f"{where}: chapter kind {kind!r} already belongs elsewhere")
            kinds[kind] = name
        hold = None
        raw_hold = entry.get("legal_hold")
        if raw_hold is not None:
            if not isinstance(raw_hold, dict):
                raise CatalogError(f"{where}: 'legal_hold' must be a table")
            hold_purpose = _str(raw_hold, "purpose", f"{where}.legal_hold")
            if hold_purpose not in purposes:
                raise CatalogError(f"{where}: legal hold names unknown purpose {hold_purpose!r}")
            if purposes[hold_purpose].legal_basis != "legal_obligation":
                raise CatalogError(f"{where}: a legal hold's purpose must be a legal obligation")
            years = _int(raw_hold, "years", f"{where}.legal_hold")
            if years < 1:
                raise CatalogError(f"{where}: a legal hold lasts at least one year")
            hold = LegalHold(purpose=hold_purpose, years=years)
        categories[name] = DataCategory(
            name=name,
            fideslang=_str(entry, "fideslang", where),
            description=_str(entry, "description", where),
            profile_fields=tuple(fields),
            chapter_kinds=tuple(chapter_kinds),
            retention_days=_int(entry, "retention_days", where),
            legal_hold=hold,
        )
    missing = REQUIRED_CATEGORIES - categories.keys()
    if missing:
        raise CatalogError(f"the catalog lacks required categories: {', '.join(sorted(missing))}")
    return Catalog(
        categories=categories,
        purposes=purposes,
        profile_fields=profile_fields,
        kind_to_category=kinds,
    )


def load_catalog(path: Path | None = None) -> Catalog:
    """Load and validate the catalog (the shipped default when ``path`` is None)."""
    if path is None:
        raw = resources.files("governance").joinpath("default_catalog.toml").read_bytes()
    else:
        raw = path.read_bytes()
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CatalogError(f"the catalog is not valid TOML: {exc}") from None
    catalog = _parse(data)
    return Catalog(
        categories=catalog.categories,
        purposes=catalog.purposes,
        profile_fields=catalog.profile_fields,
        kind_to_category=catalog.kind_to_category,
        digest=hashlib.sha256(raw).hexdigest(),
    )
