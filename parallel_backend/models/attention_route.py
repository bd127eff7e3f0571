"""Which attentions of a model call a sequence-parallel group computes: those issued inside marked modules.

A host's attention entry point (diffusers' `dispatch_attention_fn` or an attention processor, ComfyUI's
`optimized_attention_override`) is redirected for the call by the model adapter; the redirect asks the call's
`Route` (`current()`) whether the attention at hand belongs to the group. Marked modules (a family's self- or
joint-attention modules, or whole blocks: the `Attend` entries of its row in sequence_splits.py) arm the route
on entry and disarm it on exit (module hooks, sequence_hooks.py), and each run of one must issue exactly the
attentions it splits (one, or one per entry of a tuple of cuts: SD3.5's blocks issue a joint and an image-only
one). A module that issued fewer or more (an IP-adapter, a custom attention) raises instead of computing a
wrong result; every attention outside a marked module is the host's own.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass


@dataclass
class Route:
    """One call's group attention. shards: the cut of the joint sequence its attentions see (or a tuple, one
    per attention a marked module issues); via: the host's attention entry point, for messages."""

    group: object
    shards: object = None
    via: str = "attention"
    key_mask: object = None  # (B, L) bool over the whole joint sequence (True: the key takes part), or None
    module: str = ""
    issued: int = -1  # -1: no marked module is running

    @property
    def armed(self) -> bool:
        return self.issued >= 0

    @property
    def expected(self) -> int:
        return len(self.shards) if isinstance(self.shards, tuple) else 1

    def arm(self, name: str) -> None:
        self.module, self.issued = name, 0

    def disarm(self) -> None:
        if self.issued != self.expected:
            raise RuntimeError(f"sequence parallel: {self.module} issued {self.issued} attentions through "
                               f"{self.via}; it must issue {self.expected} (custom and IP-adapter attention is "
                               "not supported)")
        self.issued = -1

    def take(self):
        """Counts one attention of the running marked module; its cut."""
        self.issued += 1
        if self.issued > self.expected:
            raise RuntimeError(f"sequence parallel: {self.module} issued more attentions than the "
                               f"{self.expected} it splits")
        return self.shards[self.issued - 1] if isinstance(self.shards, tuple) else self.shards


ROUTE: ContextVar[Route | None] = ContextVar("tandem_sequence_route", default=None)


def current() -> Route | None:
    """The running split call's route, None outside one."""
    return ROUTE.get()
