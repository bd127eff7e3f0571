"""The worker side of asyncdiff: one stage of a cut model, its stale inputs per stream, and the hand-over.

A worker's StageRunner measures the model's layers (on the worker chosen to profile), holds only its own
stage's weights on its device once the host has chosen the cut, and runs its stage for each call as
`strategies.asyncdiff.stage_step` says. Activations move between neighbouring stages with torch.distributed
(non-blocking sends and receives, waited for before the call returns, so nothing is in flight between calls:
an interrupted job leaves no half-finished exchange behind). Stale inputs are kept per (job, stream).
"""

from __future__ import annotations

import time

import torch

from . import primitives
from .models.stages import Activations, Profile, adapter_for, modules_of, profile, synchronize
from .strategies.asyncdiff import explain, stage_step

ORIGIN_DTYPE = torch.float64  # the timestep a stage's input came from travels with the activations


class HandOver:
    """Sends a stage's output to the next stage piece by piece, each tensor as soon as its value is final, so
    most of the transfer overlaps the rest of the stage's compute. A skip connection lying below the lowest
    the skip stack sinks to before the stage ends is never touched again: it can leave at once (skips passed
    through from upstream leave before any compute). The hidden state leaves last. Tags pair each tensor with
    its receive: 0 the hidden state, p + 1 the skip at stack position p, then the origin timestep."""

    def __init__(self, depths: list[int], dst: int):
        self.floor = [min(depths[i:]) for i in range(len(depths))]  # per cut of the stage: positions now final
        self.dst, self.sent, self.handles, self.bytes = dst, 0, [], 0

    def send_final(self, cut: int, acts: Activations) -> None:
        """After `cut` layers of the stage: send the skips whose values are final and not yet sent."""
        ready = range(self.sent, self.floor[cut])
        if ready:
            self._send([acts.skips[p] for p in ready], [p + 1 for p in ready])
            self.sent = self.floor[cut]

    def finish(self, acts: Activations, origin: torch.Tensor) -> list:
        self.send_final(len(self.floor) - 1, acts)
        self._send([acts.h, origin], [0, len(acts.skips) + 1])
        return self.handles

    def _send(self, tensors: list[torch.Tensor], tags: list[int]) -> None:
        self.handles += primitives.post_sends(tensors, self.dst, tags)
        self.bytes += sum(t.numel() * t.element_size() for t in tensors)


class StageRunner:
    def __init__(self, module: torch.nn.Module, family: str, device: torch.device):
        self.module, self.device = module, device
        self.adapter = adapter_for(family)
        self.layers = self.adapter.layers(module)
        self.plan: dict | None = None
        self.whole_placed = True  # as loaded
        self.job = None
        self.streams: dict = {}

    # ---- placement ---------------------------------------------------------------------------------------

    def _place(self, keep: list[torch.nn.Module], whole: bool = False) -> None:
        """Puts `keep` (and the shared modules) on this worker's device and everything else on the CPU."""
        self.whole_placed = whole
        if self.device.type == "cpu" or getattr(self.module, "_tandem_shared_with_host", False):
            return  # one copy shared with the host (CPU: mapped file; GPU: CUDA IPC): moving would copy it
        if whole:
            self.module.to(self.device)
            return
        self.module.to("cpu")
        for m in [*self.adapter.shared_modules(self.module), *keep]:
            m.to(self.device)
        torch.cuda.empty_cache()

    def place_whole(self) -> None:
        """The whole model on this device (a row strategy runs next); the stage placement returns on the next
        stage call."""
        if not self.whole_placed:
            self._place([], whole=True)

    def profile(self, call, repeats: int = 3) -> dict:
        """Times every layer on this device with the call's shapes (the whole model is placed here meanwhile)."""
        self._place([], whole=True)
        call = call.to(self.device)
        with torch.inference_mode():
            ctx = self.adapter.prepare(self.module, call, call.t)
            measured = profile(self.layers, ctx, Activations(call.x), repeats)
        self.plan = None  # the placement changed; the host sends a setup next
        return {"names": measured.names, "layer_seconds": measured.seconds, "crossing": measured.crossing}

    def setup(self, plan: dict) -> dict:
        """plan: stage, stages, cuts, prev, next (ranks or None), warmup, stride, time_shift, crossing."""
        bounds = [0, *plan["cuts"], len(self.layers)]
        stage = plan["stage"]
        self.mine = self.layers[bounds[stage]:bounds[stage + 1]]
        self.first_layer = bounds[stage]
        self.crossing = Profile([], [], plan["crossing"])
        # skip-stack depth at every cut of this stage (before each of its layers, and after the last)
        self.depths = [len(plan["crossing"][c]) - 1 for c in range(bounds[stage], bounds[stage + 1] + 1)
                       ] if stage < plan["stages"] - 1 else []
        self._place(modules_of(self.mine))
        self.plan, self.streams, self.job = plan, {}, None
        return {"layers": [layer.name for layer in self.mine]}

    def probe(self, payload: dict) -> dict:
        """Times handing tensors of `specs` to (send) or from (receive) rank `peer` with nothing else running:
        what an exchange costs when it is not hidden behind compute."""
        specs = [(tuple(shape), getattr(torch, dtype)) for shape, dtype in payload["specs"]]
        tensors = [torch.zeros(shape, dtype=dtype, device=self.device) for shape, dtype in specs]
        times = []
        for _ in range(payload["repeats"] + 1):
            started = time.perf_counter()
            if payload["send"]:
                primitives.wait_all(primitives.post_sends(tensors, payload["peer"]))
            else:
                primitives.wait_all(primitives.post_receives(specs, payload["peer"], self.device)[1])
            synchronize(self.device)
            times.append(time.perf_counter() - started)
        return {"transfer_seconds": min(times[1:])}

    # ---- one call ----------------------------------------------------------------------------------------

    def _post_receive(self, rows: int) -> tuple[list, list]:
        """Posts the receives of this stage's input (hidden state, skips bottom-up, origin), tagged in that
        order as HandOver sends them; returns (buffers, handles)."""
        specs = [*self.crossing.specs(self.first_layer, rows), ((rows,), ORIGIN_DTYPE)]
        return primitives.post_receives(specs, self.plan["prev"], self.device, list(range(len(specs))))

    def call(self, call) -> tuple[torch.Tensor | None, dict]:
        plan = self.plan
        if plan is None:
            raise RuntimeError("this worker has no stage assigned (the host sends a stage setup first)")
        if self.whole_placed:
            self._place(modules_of(self.mine))
        if call.job != self.job:
            self.job, self.streams = call.job, {}
        stage, stages = plan["stage"], plan["stages"]
        state = self.streams.setdefault(call.stream, {"held": None, "async": 0})
        step = stage_step(stage, stages, call.step, plan["warmup"], plan["stride"], state["async"])
        call = call.to(self.device)
        rows = call.x.shape[0]
        handles, waited, started = [], 0.0, time.perf_counter()
        if step.input == "fresh":
            tensors = [call.x, call.t.reshape(-1).to(ORIGIN_DTYPE).expand(rows).contiguous()]
        elif step.input == "upstream":
            tensors, receiving = self._post_receive(rows)
            mark = time.perf_counter()
            primitives.wait_all(receiving)
            waited += time.perf_counter() - mark
            state["held"] = tensors
        else:
            tensors = state["held"]
            if tensors is None or tensors[0].shape[0] != rows:
                grid = explain(stages, call.step + 1, plan["warmup"], plan["stride"])
                raise RuntimeError(f"stage {stage} holds no input for stream {call.stream!r} ({rows} rows) at step "
                                   f"{call.step}: the stream began or changed shape after warm-up. The schedule "
                                   f"for one stream:\n{grid}")
        arriving = None
        if step.receive == "during":
            arriving, handles = self._post_receive(rows)
        out, computed, sent = None, 0.0, 0
        if step.compute:
            acts, origin = Activations.from_tensors(list(tensors[:-1])), tensors[-1]
            timestep = origin.to(call.t.dtype) if plan["time_shift"] and not step.sync else call.t
            hand_over = HandOver(self.depths, plan["next"]) if step.send else None
            mark = time.perf_counter()
            with torch.inference_mode():
                ctx = self.adapter.prepare(self.module, call, timestep)
                if hand_over is not None:
                    hand_over.send_final(0, acts)
                for cut, layer in enumerate(self.mine, start=1):
                    layer.run(ctx, acts)
                    if hand_over is not None:
                        hand_over.send_final(cut, acts)
            if hand_over is not None:
                handles += hand_over.finish(acts, origin)
                sent = hand_over.bytes
            synchronize(self.device)
            computed = time.perf_counter() - mark
            if stage == stages - 1:
                out = acts.h
        mark = time.perf_counter()
        primitives.wait_all(handles)
        waited += time.perf_counter() - mark
        if arriving is not None:
            state["held"] = arriving
        if not step.sync:
            state["async"] += 1
        return out, {"compute": computed, "wait": waited, "total": time.perf_counter() - started, "bytes_sent": sent}
