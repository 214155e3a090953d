"""Capped, jittered exponential backoff that resets on success (house style rule 4).

The delays come from tenacity's ``wait_exponential_jitter`` so retries across the system share one
well-tested formula; this class only keeps the attempt count for loops that are not tenacity
retries themselves (restarting a workload, re-sending an ack).
"""

from __future__ import annotations

from dataclasses import dataclass

from tenacity import RetryCallState, wait_exponential_jitter


@dataclass(frozen=True)
class BackoffPolicy:
    initial: float = 1.0
    maximum: float = 60.0
    jitter: float = 1.0


class _Attempt(RetryCallState):
    """tenacity's wait strategies read only ``attempt_number``."""

    def __init__(self, attempt_number: int) -> None:
        self.attempt_number = attempt_number


class Backoff:
    def __init__(self, policy: BackoffPolicy) -> None:
        self.policy = policy
        self._wait = wait_exponential_jitter(multiplier=policy.initial, max=policy.maximum, jitter=policy.jitter)
        self.attempts = 0

    def next_delay(self) -> float:
        self.attempts += 1
        return min(float(self._wait(_Attempt(self.attempts))), self.policy.maximum)

    def reset(self) -> None:
        self.attempts = 0
