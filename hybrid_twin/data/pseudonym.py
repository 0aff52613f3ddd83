"""Pseudonymous patient IDs: a keyed hash replaces each raw ID at import.

    key = load_pseudonym_key("HYBRID_TWIN_PSEUDONYM_KEY", None)
    pseudonymise_id("subject-17", key)      # 'P3f9c0a1b2d4e', the same for the same key

The pseudonym is "P" followed by the first 12 hex digits (48 bits) of
HMAC-SHA256(key, raw ID): stable across runs with the same key, and not computable from
the raw ID without it. The key is read from a file or an environment variable and is never
logged or written anywhere; the RAW_ID -> PSEUDONYM map is written only on request
(`write_pseudonym_map`), and should be kept apart from the run directories.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from .._atomic import atomic_open
from ..errors import InputError

PREFIX = "P"
HEX_DIGITS = 12
MIN_KEY_BYTES = 16


def load_pseudonym_key(env_var: str = "HYBRID_TWIN_PSEUDONYM_KEY",
                       key_file: str | os.PathLike | None = None) -> bytes:
    """The pseudonymisation key: the contents of `key_file` when given (surrounding
    whitespace stripped), else the value of the environment variable `env_var`.

    Raises InputError naming the config key (`data.pseudonym_key_file`) or the variable
    when neither gives a key of at least `MIN_KEY_BYTES` bytes, or the file cannot be
    read. The key itself never appears in a message.
    """
    hint = ("a random key of at least 16 bytes, e.g. from `python -c \"import secrets; "
            "print(secrets.token_hex(32))\"`")
    if key_file is not None:
        try:
            key = Path(key_file).read_bytes().strip()
        except OSError as e:
            raise InputError(f"data.pseudonym_key_file: cannot read {key_file} "
                             f"({e.strerror or e}); it must hold {hint}") from None
        if len(key) < MIN_KEY_BYTES:
            raise InputError(f"data.pseudonym_key_file: {key_file} holds "
                             f"{'no key' if not key else f'only {len(key)} bytes'}; it must "
                             f"hold {hint}")
        return key
    value = os.environ.get(env_var, "").strip()
    if not value:
        raise InputError(f"data.pseudonymise is true but there is no key: set the environment "
                         f"variable {env_var} (data.pseudonym_key_env) or data.pseudonym_key_file "
                         f"to {hint}")
    key = value.encode("utf-8")
    if len(key) < MIN_KEY_BYTES:
        raise InputError(f"the environment variable {env_var} holds only {len(key)} bytes; "
                         f"set it to {hint}")
    return key


def pseudonymise_id(raw: str, key: bytes) -> str:
    """"P" + the first 12 hex digits of HMAC-SHA256(`key`, UTF-8 `raw`)."""
    digest = hmac.new(key, str(raw).encode("utf-8"), hashlib.sha256).hexdigest()
    return PREFIX + digest[:HEX_DIGITS]


def pseudonymise_ids(raw_ids: Iterable[str], key: bytes) -> dict[str, str]:
    """{raw ID: pseudonym} for distinct `raw_ids` (in order); InputError when two IDs
    share a pseudonym (the message names positions, not IDs)."""
    mapping: dict[str, str] = {}
    owner: dict[str, int] = {}
    for i, raw in enumerate(dict.fromkeys(raw_ids)):
        p = pseudonymise_id(raw, key)
        if p in owner:
            raise InputError(f"two different patient IDs (patients {owner[p]} and {i}) have "
                             f"the same pseudonym {p}; use another pseudonymisation key")
        owner[p] = i
        mapping[raw] = p
    return mapping


def write_pseudonym_map(path: str | os.PathLike, mapping: Mapping[str, str]) -> None:
    """Write `mapping` as a CSV `RAW_ID,PSEUDONYM` (atomically; the file is created
    readable by its owner only). InputError naming `data.pseudonym_map` when its folder
    does not exist or may not be written to; other OS errors (a full disk) propagate."""
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"data.pseudonym_map: the folder {path.parent} does not exist")
    try:
        with atomic_open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["RAW_ID", "PSEUDONYM"])
            w.writerows(mapping.items())
    except PermissionError as e:
        raise InputError(f"data.pseudonym_map: cannot write {path} ({e.strerror})") from None
