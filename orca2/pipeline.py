"""Stage `run`: the whole chain from one config —
(instruct) → tasks → (select) → generate → erase → train → eval → (iterate), or persona → train → eval.

Every stage writes into one run folder and is recorded in <output>/manifest.json: its resolved config,
the hashes of its inputs and outputs, seconds, record counts, package versions and the seed. Re-running
skips a stage whose config and inputs are unchanged and whose outputs are still as it left them;
`--from STAGE` redoes that stage and the rest. A failure names the stage and keeps earlier outputs.
Each section of the config has exactly the keys of that stage's own config, minus the paths the
pipeline wires. This module names no stage: each declares how the run fills its section (`Stage.wire`), its
files and its step (orca2.stages.REGISTRY); here are the loop over them, the manifest and the seed rule.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orca2 import manifest as book
from orca2 import stages as registry
from orca2.config import _deep_update, _set_dotted, build_section, config_to_dict, parse_override, read_yaml
from orca2.errors import Orca2Error

log = logging.getLogger(__name__)
SETTINGS = ("output", "stages", "seed", "assignment", "heldout")  # the top-level keys that are not sections


def chain() -> tuple[str, ...]:
    """The stages `orca2 run` can chain, in order: the registered ones that declare how a run wires them."""
    return tuple(name for name in registry.REGISTRY if " " not in name and registry.load(name).wire)


class Pipeline:
    """One run folder: the stages' configs resolved from one YAML (every error before any work), then run in order
    with the manifest's bookkeeping. What a stage's declaration sees: `dir`, `paths`, `seed`, `data` (the YAML),
    `stages`, `configs`, `section()`, `build()`, and `before` (work to do just before a stage's files are hashed)."""

    def __init__(self, path: str, overrides: tuple[str, ...] = (), output: str | None = None):
        data, lines = read_yaml(path)
        if not isinstance(data, dict):
            raise Orca2Error(f"{path}:1: a pipeline config maps sections to settings")
        for text in overrides:
            _set_dotted(data, *parse_override(text))
        if output:
            data["output"] = output
        stages = chain()
        top = (*SETTINGS, *stages)
        for key in data:
            if key not in top:
                raise Orca2Error(f"{path}:{lines.get(key, 1)}: unknown key '{key}' (valid: {', '.join(top)})")
        if "output" not in data:
            raise Orca2Error(f"{path}: missing required key 'output' (the run folder)")
        self.source, self.lines, self.data = str(path), lines, data
        self.dir = Path(data["output"])
        self.seed = int(data.get("seed", 0))
        # the default chain: the Orca 2 stages, with instruct and iterate where configured (select only by name)
        default = ("instruct",) * ("instruct" in data) + ("tasks", "generate", "erase", "train", "eval")
        default += ("iterate",) * ("iterate" in data)
        if "persona" in data:  # role-play: the persona chain makes the training data and the eval set
            default = ("persona", "train", "eval")
        self.stages = tuple(data.get("stages") or default)
        for name in self.stages:
            if name not in stages:
                where = f"{path}:{lines.get('stages', 1)}"
                raise Orca2Error(f"{where}: unknown stage '{name}' (valid: {', '.join(stages)})")
        if [stages.index(s) for s in self.stages] != sorted(stages.index(s) for s in self.stages):
            raise Orca2Error(f"{path}: stages must keep the order {' → '.join(stages)}")
        names = ("instruct", "tasks", "traces", "sft", "heldout")
        self.paths = {n: self.dir / f"{n}.jsonl" for n in names} | {
            "assignment": self.dir / "assignment.yaml",
            "sft_start": self.dir / "sft.start.jsonl",
            "student": self.dir / "student",
            "eval": self.dir / "eval",
            "cache": self.dir / "cache",
            "persona": self.dir / "persona",
        }
        self.paths["train_data"] = self.paths["sft"]  # what train learns from (persona and iterate may change it)
        self.cache = {"cache_dir": str(self.paths["cache"])}
        self.before: dict[str, Callable[[], None]] = {}
        self.declared = {name: registry.load(name) for name in self.stages}
        for stage in self.declared.values():
            if stage.prepare:
                stage.prepare(self)
        self.configs: dict[str, Any] = {}
        for name, stage in self.declared.items():
            self.configs[name] = stage.wire(self)

    def section(self, name: str, wired: dict[str, Any], client: bool = False) -> dict[str, Any]:
        """Section `name` of the YAML with the pipeline's wiring (paths); a wired key set by hand is an error. With
        `client`, responses are cached in the run folder unless the section says otherwise."""
        section = dict(self.data.get(name) or {})
        for key in wired:
            if key in section:
                raise Orca2Error(
                    f"{self.source}:{self.lines.get(f'{name}.{key}', 1)}: key '{name}.{key}' is set by the "
                    "pipeline (stages are wired through the run folder)"
                )
        _deep_update(section, wired)
        return self.cached(section) if client else section

    def cached(self, section: dict[str, Any]) -> dict[str, Any]:
        """The section with its responses cached in the run folder, unless its own client says otherwise."""
        section["client"] = {**self.cache, **section.get("client", {})}
        return section

    def build(self, cls: type, section: dict[str, Any], prefix: str) -> Any:
        """A section's config, with the one seed rule: the run's seed is the default of every `seed` a section's
        config has — its own and its sampling's (so a rerun draws the same samples) — unless the section sets it."""
        from orca2.flags import seed_keys  # the rule `orca2 STAGE --seed` follows too

        for key in seed_keys(cls):
            part, _, inner = key.rpartition(".")
            if part:
                section[part] = {inner: self.seed, **(section.get(part) or {})}
            else:
                section.setdefault(inner, self.seed)
        return build_section(cls, section, self.source, self.lines, prefix)

    def config_dict(self, name: str) -> Any:
        cfg = self.configs[name]
        if isinstance(cfg, dict):
            return {k: config_to_dict(v) if v is not None else None for k, v in cfg.items()}
        return config_to_dict(cfg)

    def inputs(self, name: str) -> list[Path]:
        return self.declared[name].files(self, self.configs[name])[0]

    def outputs(self, name: str) -> list[Path]:
        return self.declared[name].files(self, self.configs[name])[1]

    def save(self) -> None:
        book.save(self.dir / "manifest.json", self.manifest)

    def run(self, from_stage: str | None = None) -> dict[str, Any]:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "manifest.json"
        self.manifest = json.loads(path.read_text()) if path.exists() else {"stages": {}}
        self.manifest.update(seed=self.seed, packages=book.package_versions(), config=self.source)
        self.environment = self._check_environment()
        if from_stage is not None and from_stage not in self.stages:
            raise Orca2Error(f"--from {from_stage}: not a stage of this pipeline ({', '.join(self.stages)})")
        if "assignment" in self.data and "select" not in self.stages:
            self._write_assignment()
        if "heldout" in self.data:
            self._write_heldout()
        self.forced, ran, skipped = False, [], []
        for name in self.stages:
            self.forced = self.forced or name == from_stage
            if name in self.before:
                self.before[name]()
            ran_now = book.run_step(
                self.manifest["stages"],
                name,
                self.config_dict(name),
                lambda name=name: self.declared[name].files(self, self.configs[name]),
                lambda resume, name=name: self._step(name, resume),
                forced=self.forced,
                attempts=self.manifest.setdefault("attempts", {}),
                attempt_key=name,
                commit=self.save,
                environment=self.environment,
                what=f"stage {name}",
                store_config=True,
            )
            (ran if ran_now else skipped).append(name)
        return {"ran": ran, "skipped": skipped, "manifest": str(path)}

    def _step(self, name: str, resume: bool) -> dict[str, Any]:
        try:
            return self.declared[name].step(self, self.configs[name], resume)
        except Orca2Error as exc:
            raise Orca2Error(f"stage '{name}' failed: {exc} (earlier stages' outputs are kept in {self.dir})") from None
        except Exception as exc:  # noqa: BLE001 - name the stage whatever broke
            raise Orca2Error(f"stage '{name}' failed: {type(exc).__name__}: {exc} (earlier outputs kept)") from exc

    def _check_environment(self) -> str:
        """Record this machine's environment (orca2.environment) in the manifest, keyed by its hash; warn in one
        line per earlier environment that made outputs of this run and differs from this one. Returns the key."""
        from orca2.environment import differences, environment

        current = environment()
        key = hashlib.sha256(json.dumps(current, sort_keys=True).encode()).hexdigest()[:12]
        known = self.manifest.setdefault("environments", {})
        entries = list(self.manifest["stages"].items())
        entries += [
            (f"iterate round {t} {step}", e)
            for t, r in self.manifest.get("rounds", {}).items()
            for step, e in r.items()
            if isinstance(e, dict)
        ]
        by_env: dict[str, list[str]] = {}
        for name, entry in entries:
            if entry.get("environment") not in (None, key):
                by_env.setdefault(entry["environment"], []).append(name)
        for other, names in by_env.items():
            changes = "; ".join(differences(known.get(other, {}), current))
            log.warning(
                "%s ran in another environment (%s): results may differ from a run here", ", ".join(names), changes
            )
        known[key] = current
        self.manifest["environment"] = current  # this invocation's: what `auto` resolved to, threads, CPU, libraries
        return key

    def _write_assignment(self) -> None:
        """A fixed assignment in the config (no select stage): written where generate reads it, checked first."""
        import yaml

        from orca2.io import atomic_text
        from orca2.strategies import Assignment

        with atomic_text(self.paths["assignment"]) as f:
            yaml.safe_dump(self.data["assignment"], f, sort_keys=False)
        Assignment.load(self.paths["assignment"])  # unknown strategies fail before any stage runs

    def _write_heldout(self) -> None:
        """`heldout:` a tasks section (default split test) made before the stages: eval's held-out benchmark."""
        tasks = registry.load("tasks")
        section = {"split": "test", **dict(self.data["heldout"]), "output": str(self.paths["heldout"])}
        tasks.run(self.build(tasks.config, section, "heldout."))
        self.paths["eval"].mkdir(parents=True, exist_ok=True)
        (self.paths["eval"] / "benchmarks.yaml").write_text(
            f"heldout:\n  loader: jsonl\n  path: {self.paths['heldout'].resolve()}\n  answer_type: auto\n"
            '  template: "{question}"\n  aggregate: micro\n'
        )


def run(
    config: str, overrides: tuple[str, ...] = (), from_stage: str | None = None, output: str | None = None
) -> dict[str, Any]:
    """Load the pipeline config (all errors up front) and run it."""
    return Pipeline(config, overrides, output).run(from_stage)
