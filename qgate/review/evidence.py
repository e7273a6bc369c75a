"""The stored evidence a policy's decision needs, found by the gate's own cache keys (qgate.keys)."""

from __future__ import annotations

from typing import Any, Mapping

from qgate.canonical import content_hash
from qgate.decide import Evidence, EvidenceSource, task_metric
from qgate.keys import BASELINE, evaluation_key, quant_config_id, task_config, task_runtime
from qgate.policy import Policy, recipe_text
from qgate.review.changes import suite_tasks
from qgate.store import STORED_STATUSES


class StoredEvidence:
    """Finds the stored evaluations a policy's decision needs, by the gate's own cache keys.

    For a stored run, member, format and task the key is what ``qgate run`` under ``policy`` would
    look up: the run's checkpoint, task config, qgate version and runtime, and the quantization
    config of the policy's recipe for that format (so a changed recipe needs new evidence). When
    the key scheme cannot be reproduced for a run, the run's own linked evaluations are used.
    """

    def __init__(self, store, policy: Policy):
        self.store = store
        self.policy = policy
        self._links: dict[int, list[dict]] = {}
        self._samples: dict[str, list[dict]] = {}
        self._specs: dict[str, dict | None] = {}
        self._context: dict[tuple, dict | None] = {}
        self._quant_ids: dict[tuple, str | None] = {}
        self._suite = suite_tasks(policy) or {}

    def for_run(self, run_id: int, hints: Mapping[tuple, Mapping] | None = None,
                role_of: Mapping[tuple, str] | None = None) -> EvidenceSource:
        """The decision engine's evidence source for one stored run. ``role_of`` names the role a run
        linked a member x format x task under; ``hints`` are stored decisions' numbers (used only when
        the store has no task config)."""
        hints, role_of = hints or {}, role_of or {}

        def source(member: str, fmt: str, role: str, task: str) -> Evidence | str:
            key = (member, fmt, task)
            return self.evidence(run_id, member, fmt, task, role_of.get(key, role), hints.get(key))

        return source

    def evidence(self, run_id: int, member: str, fmt: str, task: str, role: str | None = None,
                 hint: Mapping[str, Any] | None = None) -> Evidence | str:
        """What deciding one member x format x task of a stored run under the policy rests on, or a
        sentence saying which evidence is missing (nothing is guessed)."""
        base = self.baseline(run_id, member, task)
        cand = self.find(run_id, member, fmt, task, role)
        if base is None or cand is None:
            if base is not None and self.linked(run_id, member, fmt, task) is not None:
                recipe = recipe_text(self.policy.format_choice(fmt).recipe)
                return f"not evaluated with the {fmt} recipe {recipe} (the stored {fmt} evaluation used another)"
            which = " or ".join(w for w, row in (("baseline", base), (fmt, cand)) if row is None)
            return f"not evaluated (no stored {which} evaluation)"
        spec = dict(self.task_spec(cand.get("task_config_id")) or {})
        if not spec and hint:
            spec = {"higher_is_better": hint.get("higher_is_better"),
                    "per_sample": "binary" if hint.get("binary") else "continuous", "metric": hint.get("metric")}
        spec["metric"] = spec.get("metric") or cand.get("primary_metric")
        stored_higher = base.get("higher_is_better") or {}
        metric, _, _ = task_metric(self.policy.task_policy(task), spec, stored_higher)
        cand_samples = self.samples(cand["evaluation_id"])
        if metric and not any(metric in (s.get("scores") or {}) for s in cand_samples):
            return f"the stored samples have no per-sample {metric!r} scores"
        return Evidence(self.samples(base["evaluation_id"]), cand_samples, spec, stored_higher)

    def links(self, run_id: int) -> list[dict]:
        if run_id not in self._links:
            self._links[run_id] = self.store.run_evaluations(run_id)
        return self._links[run_id]

    def linked(self, run_id: int, member: str, fmt: str, task: str, role: str | None = None) -> dict | None:
        """The evaluation the run itself linked for this member x format x task (whatever its recipe)."""
        rows = [l for l in self.links(run_id) if l["member"] == member and l["format"] == fmt and l["task"] == task]
        return next((l for l in rows if l["role"] == role), rows[0] if rows else None)

    def context(self, run_id: int, member: str) -> dict | None:
        """checkpoint, qgate version and key runtime of a run's member, checked against a stored key."""
        if (run_id, member) in self._context:
            return self._context[(run_id, member)]
        ctx = None
        link = next((l for l in self.links(run_id) if l["member"] == member and l["role"] == "baseline"), None)
        row = self.store.evaluation(link["evaluation_id"]) if link else None
        if row is not None:
            runtime = dict(row.get("runtime") or {})
            # the gate keys on device and dtype (qgate.keys.task_runtime); the stored runtime also names the
            # backend, and runs from before task_runtime keyed on everything but the backend
            plain = {k: v for k, v in runtime.items() if k not in ("backend", "logprobs")}
            for candidate in (plain, {k: v for k, v in runtime.items() if k != "backend"}, runtime):
                keyed = task_runtime(candidate, self.task_spec(row["task_config_id"])) if candidate is plain else candidate
                if evaluation_key(row["checkpoint_id"], None, row["task_config_id"], row["qgate_version"],
                                  keyed) == row["id"]:
                    run = self.store.run(run_id) or {}
                    ctx = {"checkpoint_id": row["checkpoint_id"], "qgate_version": row["qgate_version"],
                           "runtime": candidate, "per_task": candidate is plain,
                           "backend": runtime.get("backend") or run.get("backend"),
                           "sample_limit": run.get("sample_limit")}
                    break
        self._context[(run_id, member)] = ctx
        return ctx

    def _task_config_id(self, run_id: int, member: str, task: str, ctx: dict) -> str | None:
        link = next((l for l in self.links(run_id) if l["member"] == member and l["task"] == task), None)
        if link is not None:
            return link["task_config_id"]
        spec = self._suite.get(task)  # a task the run did not evaluate: keyed as the policy's suite defines it
        if spec is None:
            return None
        return content_hash(task_config(spec, ctx.get("sample_limit")))

    def _quant_id(self, fmt: str, backend: str | None) -> str | None:
        if (fmt, backend) not in self._quant_ids:
            recipe = self.policy.format_choice(fmt).recipe
            self._quant_ids[(fmt, backend)] = quant_config_id(fmt, recipe, backend)
        return self._quant_ids[(fmt, backend)]

    def find(self, run_id: int, member: str, fmt: str, task: str, role: str | None = None) -> dict | None:
        """The stored evaluation (a row with evaluation_id) the policy needs, or None when the store lacks it."""
        ctx = self.context(run_id, member)
        if ctx is None:
            return self.linked(run_id, member, fmt, task, "baseline" if fmt == BASELINE else role)
        task_config_id = self._task_config_id(run_id, member, task, ctx)
        if task_config_id is None:
            return None
        quant_id = self._quant_id(fmt, ctx["backend"])
        runtime = task_runtime(ctx["runtime"], self.task_spec(task_config_id)) if ctx["per_task"] else ctx["runtime"]
        key = evaluation_key(ctx["checkpoint_id"], quant_id, task_config_id, ctx["qgate_version"], runtime)
        row = self.store.evaluation(key)
        if row is None or row.get("status") not in STORED_STATUSES:
            return None
        return {**row, "evaluation_id": row["id"]}

    def baseline(self, run_id: int, member: str, task: str) -> dict | None:
        return self.find(run_id, member, BASELINE, task)

    def task_spec(self, task_config_id: str | None) -> dict | None:
        """The suite task entry an evaluation ran (metric, higher_is_better, per_sample), as stored."""
        if not task_config_id:
            return None
        if task_config_id not in self._specs:
            row = self.store.task_config(task_config_id) or {}
            spec = (row.get("config") or {}).get("task")
            self._specs[task_config_id] = spec if isinstance(spec, dict) else None
        return self._specs[task_config_id]

    def samples(self, evaluation_id: str) -> list[dict]:
        if evaluation_id not in self._samples:
            self._samples[evaluation_id] = self.store.samples(evaluation_id)
        return self._samples[evaluation_id]
