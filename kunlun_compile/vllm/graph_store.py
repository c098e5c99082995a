"""The warm-start cache on disk: one folder per transformed graph, named by its key (graph_key.py).

    <root>/<key>/entry.json     {"format", "components", "sha256", "payload"}
    <root>/<key>/constants.pt   the tensors the graph's get_attr nodes read (only when it has any)

`payload` holds the transformed graph node by node (capture/graph_io.py), the pass records of the
report, the KIR of every generated kernel the graph calls, the nodes' `kunlun_*` meta and the
placeholder names.  `sha256` covers the payload's JSON and constants.pt, so a truncated or
altered entry is found before anything of it is used.  An entry is written into a hidden folder
and renamed into place: readers see whole entries or none.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Dict, Optional

import torch

from .graph_key import FORMAT

ENTRY = "entry.json"
CONSTANTS = "constants.pt"


class CorruptEntry(Exception):
    """An entry exists but cannot be used; the message says why."""


class GraphStore:
    def __init__(self, root: str):
        self.root = root

    def path(self, key: str) -> str:
        return os.path.join(self.root, key)

    def load(self, key: str) -> Optional[Dict[str, Any]]:
        """The entry's {"components", "payload", "constants"}; None when there is none."""
        folder = self.path(key)
        if not os.path.isdir(folder):
            return None
        try:
            with open(os.path.join(folder, ENTRY), "rb") as f:
                raw = f.read()
            doc = json.loads(raw)
            payload_text = json.dumps(doc["payload"], sort_keys=True)
            constants_bytes = _read_optional(os.path.join(folder, CONSTANTS))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CorruptEntry(f"{ENTRY} unreadable: {type(e).__name__}: {e}") from e
        if doc.get("format") != FORMAT:
            raise CorruptEntry(f"entry format {doc.get('format')!r}, this code reads {FORMAT}")
        if doc.get("sha256") != _digest(payload_text, constants_bytes):
            raise CorruptEntry("checksum mismatch (the entry was altered or partly written)")
        constants = {}
        if constants_bytes is not None:
            try:
                constants = torch.load(os.path.join(folder, CONSTANTS), weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is unusable
                raise CorruptEntry(f"{CONSTANTS} unreadable: {type(e).__name__}: {e}") from e
        return {"components": doc["components"], "payload": doc["payload"], "constants": constants}

    def components(self, key: str) -> Optional[Dict[str, str]]:
        """What the entry `key` was made from, if it can be read (to name a mismatch)."""
        try:
            with open(os.path.join(self.path(key), ENTRY)) as f:
                return json.load(f)["components"]
        except Exception:  # noqa: BLE001 - absent or unreadable: nothing to compare
            return None

    def save(self, key: str, components: Dict[str, str], payload: Dict[str, Any],
             constants: Dict[str, torch.Tensor]) -> str:
        """Write the entry (replacing one that is there, e.g. a corrupt one); returns its folder."""
        os.makedirs(self.root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".entry_tmp_", dir=self.root)
        try:
            constants_bytes = None
            if constants:
                torch.save(constants, os.path.join(tmp, CONSTANTS))
                constants_bytes = _read_optional(os.path.join(tmp, CONSTANTS))
            payload_text = json.dumps(payload, sort_keys=True)
            doc = {"format": FORMAT, "components": components, "sha256": _digest(payload_text, constants_bytes),
                   "payload": payload}
            with open(os.path.join(tmp, ENTRY), "w") as f:
                json.dump(doc, f, sort_keys=True)
            folder = self.path(key)
            if os.path.isdir(folder):
                shutil.rmtree(folder)
            try:
                os.rename(tmp, folder)
            except OSError:
                if not os.path.isdir(folder):
                    raise  # else another process wrote the same entry in between: it stands
            return folder
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)


def _read_optional(path: str) -> Optional[bytes]:
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return f.read()


def _digest(payload_text: str, constants_bytes: Optional[bytes]) -> str:
    digest = hashlib.sha256(payload_text.encode())
    if constants_bytes is not None:
        digest.update(constants_bytes)
    return digest.hexdigest()
