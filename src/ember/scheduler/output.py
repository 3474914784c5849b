"""What the scheduler decided for one step."""

from __future__ import annotations

from dataclasses import dataclass, field

from ember.request import Request


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens to compute this step, starting at request.num_computed_tokens
    block_ids: list[int]  # the request's whole block table after allocation
    # Draft tokens verified this step: the last `len(spec_token_ids)` of the `num_new_tokens` positions.
    spec_token_ids: list[int] = field(default_factory=list)
    # With local KV-cache groups: the request's table in each later group (None: a block its window let go).
    group_block_ids: list[list[int | None]] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled
