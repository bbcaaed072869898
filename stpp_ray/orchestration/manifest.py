"""`manifest.json`: per finished stage its fingerprint, result and outputs.

A stage fingerprint hashes the config keys the stage depends on, chained with its upstream
stage's fingerprint (`methods.base.derive_fingerprint`). A stage whose recorded fingerprint matches is
reused; otherwise it (and so everything downstream) is recomputed, and the reason is printed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..files import write_json_atomic
from ..methods.base import Stage


class Manifest:
    def __init__(self, path: Path):
        self.path = path
        self.stages: dict[str, dict] = {}
        if path.exists():
            self.stages = json.loads(path.read_text()).get("stages", {})

    def done(self, stage: Stage) -> dict | None:
        """The recorded result of `stage` if it ran with the same fingerprint."""
        entry = self.stages.get(stage.name)
        if entry and entry.get("fingerprint") == stage.fingerprint:
            if all(k in entry["result"] for k in stage.needs):
                return entry["result"]
            print(f"[pipeline] stage '{stage.name}' was recorded by an older stpp_ray (no "
                  f"{', '.join(k for k in stage.needs if k not in entry['result'])}): recomputing it", flush=True)
            return None
        if entry:
            print(f"[pipeline] config changed since stage '{stage.name}' ran "
                  f"(fingerprint {entry.get('fingerprint')} -> {stage.fingerprint}): recomputing it", flush=True)
        return None

    def record(self, stage: Stage, result: dict) -> None:
        self.stages[stage.name] = {"fingerprint": stage.fingerprint, "result": result,
                                   "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json_atomic(self.path, {"stages": self.stages})
