"""Running a hypothesis state machine once per eviction policy (the pool and system
machines share this runner)."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test


def run_policy_machine(
    base: type,
    policy: str,
    *,
    prefix: str,
    steps: int,
    steps_per_example: int,
    slack: tuple[int, int],
) -> None:
    """Run ``base`` (a ``RuleBasedStateMachine`` with a ``policy`` attribute) under
    ``policy`` for about ``steps`` steps, ``steps_per_example`` per run; hypothesis ends
    some runs early, so ``slack`` (``(6, 5)``: 20%) more runs are asked for."""
    machine = type(f"{prefix}_{policy.replace(':', '_')}", (base,), {"policy": policy})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=max(1, steps * slack[0] // (slack[1] * steps_per_example)),
            stateful_step_count=steps_per_example,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
