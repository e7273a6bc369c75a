"""What a gate run can check before it touches the database or loads a model, so that bad input
costs seconds and leaves no trace: every suite task is registered (qgate's task folders or
lm-eval's registry), and every recipe rule of every format the run may try (candidates and
fallbacks) matches a tensor of each member, read from the member's config on the meta device."""

from __future__ import annotations

from typing import Iterable, Sequence

from qgate.errors import QgateError
from qgate.offline import check_hub_data


def check_suite_tasks(suite) -> None:
    """Every task's lm_eval_task exists; one TaskManager (lm-eval's index is built once)."""
    from qgate.evaluation.runner import _quiet_lm_eval, task_manager

    tasks = list(suite.tasks)
    if not tasks:
        return
    check_hub_data(tasks)
    # the registry is indexed only when some task needs it (hub data), as the evaluation itself does
    hub = next((t for t in tasks if not t.offline), None)
    with _quiet_lm_eval():
        known = set(task_manager(hub or tasks[0]).all_tasks)
    from qgate.evaluation.humaneval import CODE_TASKS
    from qgate.evaluation.sandbox import check_network_isolation

    if any(t.lm_eval_task in CODE_TASKS for t in tasks):
        check_network_isolation()  # model code needs a network namespace, or the user's explicit opt-in
    for t in tasks:
        if t.lm_eval_task not in known:
            where = "qgate's task folders" + ("" if t.offline else " or lm-eval's registry")
            raise QgateError(f"suite {suite.name}: task {t.name}: lm_eval_task {t.lm_eval_task!r} not found in "
                             f"{where}")


def check_recipes(policy, formats: Sequence[str], members: Iterable) -> None:
    """Each recipe rule the run may apply matches a tensor of each member (no weights are read)."""
    from qgate.decide import fallback_chain
    from qgate.footprint import load_config, meta_model
    from qgate.recipes import plan_model

    chain = list(dict.fromkeys(f for fmt in formats for f, _ in fallback_chain(policy, fmt)))
    for m in members:
        spec = m.spec
        model = meta_model(load_config(spec.location, revision=spec.revision))
        for fmt in chain:
            recipe = policy.format_choice(fmt).recipe
            try:
                plan_model(model, recipe, fmt)
            except QgateError as exc:
                raise QgateError(f"member {m.name}, format {fmt}: {exc}") from None
