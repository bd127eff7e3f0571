"""Named links between devices, as data: the effective bandwidth one device reaches per direction and the
latency of one message, each from a published figure and a stated efficiency factor.

Every figure is a prediction input, not a measurement on the user's machine (except `loopback-gloo`, measured
here): the spec figure is the raw per-direction rate; the efficiency factor is what a point-to-point copy of
large messages typically reaches of it (protocol headers, flow control, NCCL's protocol choice). The model
assumes each device has its own link at that rate in each direction at once (a switch, no shared root port);
a PCIe tree whose devices share one uplink reaches less.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Link:
    """A link's effective figures: `bandwidth` bytes/s per direction, `latency` s per message; `source` says
    where they come from."""

    name: str
    bandwidth: float
    latency: float
    source: str

    def __post_init__(self):
        if not (self.bandwidth > 0 and self.latency >= 0):
            raise ValueError(f"link {self.name!r} needs a bandwidth > 0 and a latency >= 0; got "
                             f"{self.bandwidth} B/s, {self.latency} s")

    def seconds(self, nbytes: float, messages: int = 1) -> float:
        """Time to send `nbytes` in `messages` messages over this link (0 for nothing)."""
        return messages * self.latency + nbytes / self.bandwidth if nbytes > 0 else 0.0


def _profile(name: str, raw_gb_s: float, efficiency: float, latency_s: float, spec: str) -> Link:
    return Link(name, raw_gb_s * GB * efficiency, latency_s,
                f"{spec}: {raw_gb_s:g} GB/s per direction raw x {efficiency:g} efficiency; {latency_s * 1e6:g} us "
                "per message")


PROFILES: dict[str, Link] = {link.name: link for link in (
    # PCIe 4.0: 16 GT/s per lane, 128b/130b coding -> 1.969 GB/s per lane, 31.5 GB/s for x16 (PCI-SIG spec).
    # GPU peer copies over PCIe 4.0 x16 measure ~25 GB/s (p2pBandwidthLatencyTest): 0.8. Latency: a few us of
    # wire and DMA set-up plus NCCL's kernel launch, ~10 us.
    _profile("pcie4x16", 31.5, 0.8, 10e-6, "PCIe 4.0 x16 (PCI-SIG)"),
    # PCIe 5.0: 32 GT/s per lane -> 63 GB/s for x16 (PCI-SIG spec), same efficiency and latency as 4.0.
    _profile("pcie5x16", 63.0, 0.8, 10e-6, "PCIe 5.0 x16 (PCI-SIG)"),
    # A100 SXM, NVLink 3: 12 links, 600 GB/s total both directions -> 300 GB/s per direction (NVIDIA A100
    # datasheet). nccl-tests reach ~230 GB/s bus bandwidth on 8x A100: 0.75. NCCL small-message latency ~5 us.
    _profile("nvlink-a100", 300.0, 0.75, 5e-6, "A100 SXM NVLink 3 (NVIDIA datasheet: 600 GB/s bidirectional)"),
    # H100 SXM, NVLink 4: 18 links, 900 GB/s total -> 450 GB/s per direction (NVIDIA H100 datasheet).
    # nccl-tests reach ~360 GB/s bus bandwidth on 8x H100: 0.8.
    _profile("nvlink-h100", 450.0, 0.8, 5e-6, "H100 SXM NVLink 4 (NVIDIA datasheet: 900 GB/s bidirectional)"),
    # GeForce and Intel Arc cards have no peer-to-peer over PCIe: NCCL (or oneCCL) copies through pinned host
    # memory, two hops. design/PERFORMANCE.md records about 6-25 GB/s with 12-18 us per message on PCIe 4.0 x16
    # and about 42 GB/s, 14 us on PCIe 5.0 x16 without peer-to-peer. Taken: 12 GB/s, 15 us (4.0); 42 GB/s, 14 us
    # (5.0), as 31.5 x 0.38 and 63 x 0.67 of the raw rate.
    _profile("pcie4-nop2p", 31.5, 0.38, 15e-6, "PCIe 4.0 x16 without peer-to-peer (copies through host memory)"),
    _profile("pcie5-nop2p", 63.0, 0.67, 14e-6, "PCIe 5.0 x16 without peer-to-peer (copies through host memory)"),
    # PCIe 4.0 x8 (15.75 GB/s raw; the RTX 2000 Ada's slot) with peer-to-peer over the SYS path (across the CPU
    # sockets, as Raylight's README reports for its two cards): the inter-socket hop halves what a copy reaches,
    # 0.5; latency as without peer-to-peer.
    _profile("pcie4x8-sys", 15.75, 0.5, 15e-6, "PCIe 4.0 x8, peer-to-peer across CPU sockets (SYS path)"),
    # H20: NVLink 4 at 900 GB/s bidirectional, as the H100 SXM (willitrunai.com's H20 page); the same efficiency.
    _profile("nvlink-h20", 450.0, 0.8, 5e-6, "H20 NVLink 4 (900 GB/s bidirectional)"),
    # H800: NVLink cut to 400 GB/s bidirectional -> 200 per direction (the export model); the H100's efficiency.
    _profile("nvlink-h800", 200.0, 0.8, 5e-6, "H800 NVLink (400 GB/s bidirectional)"),
    # B200, NVLink 5: 1.8 TB/s bidirectional per GPU -> 900 per direction (NVIDIA HGX B200); the H100's efficiency.
    _profile("nvlink-b200", 900.0, 0.8, 5e-6, "B200 NVLink 5 (1.8 TB/s bidirectional)"),
    # 25 GbE: 25 Gbit/s = 3.125 GB/s (IEEE 802.3by), TCP as 10 GbE: 0.9, ~50 us per message across one switch.
    _profile("ethernet-25g", 3.125, 0.9, 50e-6, "25 Gigabit Ethernet (IEEE 802.3by), TCP"),
    # 10 GbE: 10 Gbit/s = 1.25 GB/s (IEEE 802.3ae). TCP over Ethernet frames of 1500 bytes keeps ~94 % as
    # payload; 0.9 with the stack's copies. Latency of a TCP message across one switch: ~50 us.
    _profile("ethernet-10g", 1.25, 0.9, 50e-6, "10 Gigabit Ethernet (IEEE 802.3ae), TCP"),
    # 100 GbE: 12.5 GB/s (IEEE 802.3ba). With RDMA (RoCE v2, as NCCL uses it) ~0.8; plain TCP reaches less.
    _profile("ethernet-100g", 12.5, 0.8, 20e-6, "100 Gigabit Ethernet (IEEE 802.3ba), RoCE v2"),
    # Two gloo processes on one machine exchanging over loopback TCP, measured on the 2-core development VM
    # (2026-12-01, torch 2.13 CPU): a simultaneous swap of 32 MiB each way took 20-23 ms (1.44-1.66 GB/s per
    # direction; 8 MiB: 1.07-1.48 GB/s), of 4 bytes 170-190 us; fastest of 5, two runs. Not a spec figure: it
    # holds for this machine, under that load.
    Link("loopback-gloo", 1.5 * GB, 150e-6, "measured on the 2-core development VM: gloo over loopback TCP between 2 "
         "processes, 1.5 GB/s per direction (32 MiB swaps), 150 us per small message"),
)}

PROBE = "probe"  # `tandem plan --link probe`: measured on the devices themselves (plan/probe.py)
CPU_DEFAULT = "loopback-gloo"  # CPU workers on one machine talk over loopback
CUDA_DEFAULT = "pcie4x16"  # the commonest link between two GPUs; said in the output when assumed


ALIASES = {"pcie4": "pcie4x16", "pcie5": "pcie5x16"}  # `tandem plan --link`'s short names


def link_named(name: str) -> Link:
    """The named profile (or ALIASES' short name for one); a name that is not one is refused in one sentence."""
    try:
        return PROFILES[ALIASES.get(name, name)]
    except (KeyError, TypeError):
        raise ValueError(f"unknown link {name!r}; choose {PROBE} (measure it) or one of: {', '.join(PROFILES)}") from None
