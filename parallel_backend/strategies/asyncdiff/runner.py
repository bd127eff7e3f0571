"""The worker side of asyncdiff: one stage of a cut model, its stale inputs per stream, and the hand-over.

A worker's StageRunner measures the model's layers (on the worker chosen to profile), holds only its own
stage's weights on its device once the host has chosen the cut, and runs, for each call, the list of actions
`schedule.stage_actions` gives. Activations move between neighbouring stages with torch.distributed
(non-blocking sends and receives, waited for before the call returns, so nothing is in flight between calls:
an interrupted job leaves no half-finished exchange behind). Stale inputs are kept per (job, stream).

Point-to-point order: a stage sends its output in `schedule.handover_order` (skips bottom-up as each becomes
final, then the hidden state, then the origin timestep) and the next stage posts its receives in that same
order, since NCCL pairs messages by issue order (primitives' strict mode checks this on gloo).
"""

from __future__ import annotations

import time

import torch

from ...runtime import primitives
from ...runtime.messages import Computed
from ...models.stage_families import adapter_for
from ...models.stages import Activations, Placement, Profile, Streamed, modules_of, profile, synchronize, \
    weights_of
from . import schedule
from .messages import PlaceStages, ProbeExchange, ProfileLayers, StageCall, StagePlan

ORIGIN_DTYPE = torch.float64  # the timestep a stage's input came from travels with the activations


class HandOver:
    """Sends a stage's output to the next stage piece by piece, each tensor as soon as its value is final, so
    most of the transfer overlaps the rest of the stage's compute. A skip connection lying below the lowest
    the skip stack sinks to before the stage ends is never touched again: it can leave at once (skips passed
    through from upstream leave before any compute). The hidden state leaves last, then the origin timestep:
    the order of `schedule.handover_order`, which the receiver follows."""

    def __init__(self, depths: list[int], dst: int):
        self.floor = [min(depths[i:]) for i in range(len(depths))]  # per cut of the stage: positions now final
        self.dst, self.sent, self.handles, self.bytes, self.order = dst, 0, [], 0, []

    def send_final(self, cut: int, acts: Activations) -> None:
        """After `cut` layers of the stage: send the skips whose values are final and not yet sent."""
        ready = range(self.sent, self.floor[cut])
        if ready:
            self._send([acts.skips[p] for p in ready], [p + 1 for p in ready])
            self.sent = self.floor[cut]

    def finish(self, acts: Activations, origin: torch.Tensor) -> list:
        self.send_final(len(self.floor) - 1, acts)
        self._send([acts.h, origin], [0, len(acts.skips) + 1])
        if self.order != schedule.handover_order(len(acts.skips)):
            raise RuntimeError(f"stage hand-over sent {self.order}, not the schedule's order "
                               f"{schedule.handover_order(len(acts.skips))}")
        return self.handles

    def _send(self, tensors: list[torch.Tensor], tags: list[int]) -> None:
        self.handles += primitives.post_sends(tensors, self.dst, tags)
        self.order += tags
        self.bytes += sum(t.numel() * t.element_size() for t in tensors)


class _Stream:
    """What one stream's stage keeps between calls, and the working values of the call being run."""

    def __init__(self):
        self.held: list | None = None  # [h, skips..., origin] received for the next call
        self.async_calls = 0
        self.input = self.arriving = self.out = None
        self.handles: list = []
        self.compute_s = self.wait_s = 0.0
        self.bytes = 0


class StageRunner:
    def __init__(self, module: torch.nn.Module, family: str, device: torch.device):
        self.module, self.device = module, device
        self.adapter = adapter_for(family)
        self.layers = self.adapter.layers(module)
        self.plan: StagePlan | None = None
        self.placement = Placement(module, device)
        self.streamed_layers: list = []  # this stage's layers whose weights come from host memory each call
        self.streamed, self.cap = Streamed(self.placement, []), None
        self.job = None
        self.streams: dict = {}

    # ---- placement ---------------------------------------------------------------------------------------

    def _place(self, keep: list[torch.nn.Module], whole: bool = False) -> None:
        """Puts `keep` and the shared modules on this worker's device, every other weight parked (a stage holds
        only its own layers' weights), or, `whole`, the whole model back."""
        self.placement.place([] if whole else [*self.adapter.shared_modules(self.module), *keep], whole)

    def _place_stage(self) -> None:
        """This stage's layers on the device but those it streams (parked with the other stages' weights, brought
        to the device for their own run: `Streamed`)."""
        streamed = {id(layer) for layer in self.streamed_layers}
        self._place(modules_of([layer for layer in self.mine if id(layer) not in streamed]))
        room = None if self.cap is None else self.cap - self.held_bytes()
        self.streamed = Streamed(self.placement, self.streamed_layers, room)

    def held_bytes(self) -> int:
        return self.placement.held_bytes()

    def place_whole(self) -> None:
        """The whole model on this device (a plain forward runs next); the stage placement returns on the next
        stage call."""
        if self.placement.placed != "whole":
            self._place([], whole=True)

    def profile(self, message: ProfileLayers) -> dict:
        """Times every layer on this device with the call's shapes. Weights in host memory (a stage cut, as it
        loads) reach the device a layer at a time, outside the timed runs, so the device never holds them all."""
        self.placement.to_host()
        call = message.call.to(self.device)
        on_device = self.placement.on_device
        with torch.inference_mode(), on_device(self.adapter.shared_modules(self.module)):
            ctx = self.adapter.prepare(self.module, call, call.t)
            measured = profile(self.layers, ctx, Activations(call.x), repeats=3,
                               around=lambda layer: on_device([m for m in layer.modules if m is not None]))
        self.plan = None  # the placement changed; the host sends a setup next
        return {"names": measured.names, "layer_seconds": measured.seconds, "crossing": measured.crossing,
                "layer_bytes": [weights_of(layer.modules) for layer in self.layers],
                "held_bytes": (weights_of(self.adapter.shared_modules(self.module)), 0, 0)}

    def setup(self, message: PlaceStages) -> dict:
        plan = message.plan
        bounds = [0, *plan.cuts, len(self.layers)]
        self.mine = self.layers[bounds[plan.stage]:bounds[plan.stage + 1]]
        self.first_layer = bounds[plan.stage]
        self.crossing = Profile([], [], plan.crossing)
        # skip-stack depth at every cut of this stage (before each of its layers, and after the last)
        self.depths = [len(plan.crossing[c]) - 1 for c in range(bounds[plan.stage], bounds[plan.stage + 1] + 1)
                       ] if plan.next is not None else []
        self.cap = message.cap
        self.streamed_layers = [self.layers[i] for i in sorted(set(message.streamed))
                                if bounds[plan.stage] <= i < bounds[plan.stage + 1]]
        self._place_stage()
        self.plan, self.streams, self.job = plan, {}, None
        return {"layers": [layer.name for layer in self.mine],
                "streamed": [layer.name for layer in self.streamed_layers],
                "streamed_bytes": self.streamed.bytes}

    def probe(self, message: ProbeExchange) -> dict:
        """Times handing tensors of `specs` to (send) or from (receive) rank `peer` with nothing else running:
        what an exchange costs when it is not hidden behind compute."""
        specs = [(tuple(shape), getattr(torch, dtype)) for shape, dtype in message.specs]
        tensors = [torch.zeros(shape, dtype=dtype, device=self.device) for shape, dtype in specs]
        times = []
        for _ in range(message.repeats + 1):
            started = time.perf_counter()
            if message.send:
                primitives.wait_all(primitives.post_sends(tensors, message.peer), self.device)
            else:
                primitives.wait_all(primitives.post_receives(specs, message.peer, self.device)[1], self.device)
            times.append(time.perf_counter() - started)
        return {"transfer_seconds": min(times[1:])}

    # ---- one call ----------------------------------------------------------------------------------------

    def _post_receive(self, rows: int) -> tuple[list, list]:
        """Posts the receives of this stage's input in the sender's order (`schedule.handover_order`);
        returns ([h, skips..., origin], handles)."""
        specs = [*self.crossing.specs(self.first_layer, rows), ((rows,), ORIGIN_DTYPE)]
        order = schedule.handover_order(len(specs) - 2)
        posted, handles = primitives.post_receives([specs[i] for i in order], self.plan.prev, self.device, order)
        buffers = [None] * len(specs)
        for index, buffer in zip(order, posted):
            buffers[index] = buffer
        return buffers, handles

    def call(self, message: StageCall) -> Computed:
        plan = self.plan
        if plan is None:
            raise RuntimeError("this worker has no stage assigned (the host sends a stage setup first)")
        if not self.placement.staged:
            self._place_stage()
        call = message.call
        if call.job != self.job:
            self.job, self.streams = call.job, {}
        stream = self.streams.setdefault(call.stream, _Stream())
        step = schedule.stage_step(plan.stage, plan.stages, call.step, plan.warmup, plan.stride, stream.async_calls)
        call = call.to(self.device)
        stream.handles, stream.compute_s, stream.wait_s, stream.bytes, stream.out = [], 0.0, 0.0, 0, None
        for action in schedule.stage_actions(step):
            self._ACTIONS[action](self, stream, call, step)
        return Computed(stream.out, stream.compute_s, stream.wait_s, stream.bytes,
                        extra={"layers": len(self.mine), "weights_bytes": self.held_bytes(),
                               "streamed_bytes": self.streamed.bytes})

    # the actions of schedule.stage_actions; each works on the stream's state for this call

    def _take_fresh(self, stream: _Stream, call, step) -> None:
        rows = call.x.shape[0]
        stream.input = [call.x, call.t.reshape(-1).to(ORIGIN_DTYPE).expand(rows).contiguous()]

    def _receive_upstream(self, stream: _Stream, call, step) -> None:
        buffers, handles = self._post_receive(call.x.shape[0])
        mark = time.perf_counter()
        primitives.wait_all(handles, self.device)
        stream.wait_s += time.perf_counter() - mark
        stream.input = stream.held = buffers

    def _take_held(self, stream: _Stream, call, step) -> None:
        rows = call.x.shape[0]
        if stream.held is None or stream.held[0].shape[0] != rows:
            plan = self.plan
            grid = schedule.explain(plan.stages, call.step + 1, plan.warmup, plan.stride)
            raise RuntimeError(f"stage {plan.stage} holds no input for stream {call.stream!r} ({rows} rows) at step "
                               f"{call.step}: the stream began or changed shape after warm-up. The schedule for "
                               f"one stream:\n{grid}")
        stream.input = stream.held

    def _post_arrival(self, stream: _Stream, call, step) -> None:
        stream.arriving, handles = self._post_receive(call.x.shape[0])
        stream.handles += handles

    def _compute(self, stream: _Stream, call, step, send: bool = False) -> None:
        plan = self.plan
        acts, origin = Activations.from_tensors(list(stream.input[:-1])), stream.input[-1]
        timestep = origin.to(call.t.dtype) if plan.time_shift and not step.sync else call.t
        hand_over = HandOver(self.depths, plan.next) if send else None
        mark = time.perf_counter()
        with torch.inference_mode(), self.streamed.call() as streamed:
            ctx = self.adapter.prepare(self.module, call, timestep)
            if hand_over is not None:
                hand_over.send_final(0, acts)
            for cut, layer in enumerate(self.mine, start=1):
                streamed.before(layer)
                layer.run(ctx, acts)
                streamed.after(layer)
                if hand_over is not None:
                    hand_over.send_final(cut, acts)
        if hand_over is not None:
            stream.handles += hand_over.finish(acts, origin)
            stream.bytes += hand_over.bytes
        synchronize(self.device)
        stream.compute_s += time.perf_counter() - mark
        if plan.next is None:
            stream.out = acts.h

    def _compute_and_send(self, stream: _Stream, call, step) -> None:
        self._compute(stream, call, step, send=True)

    def _wait(self, stream: _Stream, call, step) -> None:
        mark = time.perf_counter()
        primitives.wait_all(stream.handles, self.device)
        stream.wait_s += time.perf_counter() - mark
        stream.handles = []

    def _keep_arrival(self, stream: _Stream, call, step) -> None:
        stream.held, stream.arriving = stream.arriving, None

    def _count_async(self, stream: _Stream, call, step) -> None:
        stream.async_calls += 1

    _ACTIONS = {schedule.TAKE_FRESH: _take_fresh, schedule.RECEIVE_UPSTREAM: _receive_upstream,
                schedule.TAKE_HELD: _take_held, schedule.POST_RECEIVE: _post_arrival, schedule.COMPUTE: _compute,
                schedule.COMPUTE_AND_SEND: _compute_and_send, schedule.WAIT: _wait,
                schedule.KEEP_ARRIVAL: _keep_arrival, schedule.COUNT_ASYNC: _count_async}
