"""A parallel layout and the training settings it runs under, with the validity rules in one place.

Rank order (innermost first): TP, then CP, then DP (EP groups are carved out of consecutive DP x TP ranks,
as in DeepSeek-V3 and Megatron's expert parallelism), then PP. So a TP group is `1` apart, an EP group spans
`ep` consecutive ranks, a CP group is `tp` apart, a DP group `cp*tp` apart and a PP group `dp*cp*tp` apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import ConfigError
from .models import ModelShape

SCHEDULES = ("1f1b", "interleaved-1f1b", "dualpipe", "dualpipev")
DUAL = ("dualpipe", "dualpipev")  # bidirectional: a rank holds two pieces of the layers (memory.rank_pieces)
PRECISIONS = ("fp8", "mxfp8", "bf16", "fp32")
RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class Layout:
    dp: int = 1  # data-parallel replicas (of the non-expert weights)
    tp: int = 1  # tensor parallel (heads, MLP columns, vocab); kept inside a node
    pp: int = 1  # pipeline stages
    ep: int = 1  # expert parallel: routed experts split over ep of the dp*tp ranks
    zero: int = 1  # ZeRO stage: 1 shards optimizer states, 2 also gradients, 3 also weights (0 = none)
    schedule: str = "1f1b"  # pipeline schedule: 1f1b, interleaved-1f1b (Megatron virtual stages), dualpipe
    #                         (DeepSeek-V3: two copies of the model over the pipeline) or dualpipev (one copy)
    micro_batch: int = 1  # sequences per micro-batch per DP rank
    recompute: str = "none"  # none | selective (DeepSeek-V3: norms, MLA up-projections, SwiGLU; FP8 MoE
    #                           inputs) | full (keep only each layer's input)
    virtual_stages: int = 2  # interleaved-1f1b: model chunks per pipeline rank (Narayanan et al. 2021)
    cp: int = 1  # context parallel: ranks sharing each sequence (MLA's compressed KV all-gathered per layer)

    @property
    def gpus(self) -> int:
        return self.dp * self.cp * self.tp * self.pp

    @property
    def edp(self) -> int:
        """Expert data-parallel degree: replicas of each routed expert (context-parallel ranks hold the same)."""
        return self.dp * self.cp * self.tp // self.ep

    @property
    def dense_replicas(self) -> int:
        """Ranks holding the same non-expert weights and averaging their gradients (ZeRO shards over them)."""
        return self.dp * self.cp

    def short(self) -> str:
        ck = "" if self.recompute == "none" else f" recompute-{self.recompute}"
        sched = f"interleaved-1f1b(v{self.virtual_stages})" if self.schedule == "interleaved-1f1b" else self.schedule
        cp = f" CP{self.cp}" if self.cp > 1 else ""
        return (f"DP{self.dp}{cp} TP{self.tp} PP{self.pp} EP{self.ep} ZeRO-{self.zero} {sched} "
                f"mb{self.micro_batch}{ck}")

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TrainSettings:
    """What a step is and how it runs, independent of the layout."""

    seq_len: int = 4096
    global_batch: int = 1920  # sequences per optimizer step (DeepSeek-V3 ramped 3072 -> 15360; any works)
    # matmul precision: fp8 (DeepSeek-V3's 1x128 / 128x128 block scales), mxfp8 (OCP MX, 1x32 E8M0 scales in
    # hardware: Blackwell), bf16 or fp32; the attention core is always BF16
    precision: str = "fp8"
    # fraction of DP/EP/PP communication hidden behind compute (TP is never hidden); None = what the
    # schedule can hide (steptime.py docstring)
    overlap: float | None = None
    node_limit: int | None = 4  # node-limited routing: a token reaches at most this many nodes (V3: 4)
    dispatch_bytes: float = 1.0  # per hidden element: FP8 dispatch (DeepSeek-V3), 2 for BF16
    combine_bytes: float = 2.0  # BF16 combine (and both backward all-to-alls)
    weight_bytes: float = 2.0  # working weights (BF16)
    master_bytes: float = 4.0  # FP32 master copy (0 = none, weights are the master)
    grad_bytes: float = 4.0  # FP32 gradient accumulation (DeepSeek-V3)
    moment_bytes: float = 2.0  # each AdamW moment (BF16 in DeepSeek-V3; 4 for FP32)
    act_bytes: float = 2.0  # activations (BF16)
    grad_comm_bytes: float = 2.0  # gradient all-reduce / reduce-scatter payload per element
    memory_headroom: float = 0.9  # usable fraction of device memory (allocator, workspaces, NCCL buffers)
    # TP with sequence parallelism (Megatron, DeepSeek): norms, router and routed experts see tokens / TP.
    # False: moeforge's own TP (activations outside the split heads and columns, logits whole on each rank)
    sequence_parallel: bool = True
    # Routed-expert rows on the priced rank over the mean rank's (1 = balanced experts; `plan --against`
    # measures it from the run's logged expert_counts: a short run's routing is far from balanced)
    expert_load: float = 1.0
    # SMs the EP dispatch/combine kernels take from the computation they overlap: DeepSeek-V3's all-to-all
    # kernels run on 20 of the H800's 132 SMs, "which limits computational throughput" (V3 report, Sec.
    # 3.2.2 and 3.5.1). 0 = communication offloaded from the SMs (the copy engines, or the hook-based
    # overlap of DeepEP's low-latency kernels).
    ep_comm_sms: int = 20

    def validate(self) -> "TrainSettings":
        if self.seq_len < 1 or self.global_batch < 1:
            raise ConfigError("seq_len and global_batch must be >= 1")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.overlap is not None and not 0 <= self.overlap <= 1:
            raise ConfigError("overlap must be in [0, 1]")
        if not 0 < self.memory_headroom <= 1:
            raise ConfigError("memory_headroom must be in (0, 1]")
        if self.expert_load <= 0:
            raise ConfigError(f"expert_load must be > 0, got {self.expert_load}")
        if self.ep_comm_sms < 0:
            raise ConfigError(f"ep_comm_sms must be >= 0, got {self.ep_comm_sms}")
        return self


def check_layout(model: ModelShape, layout: Layout, gpus: int, settings: TrainSettings,
                 gpus_per_node: int | None = None) -> None:
    """Raise ConfigError naming the first broken rule and the valid choices."""
    lo = layout
    if min(lo.dp, lo.tp, lo.pp, lo.ep, lo.micro_batch, lo.cp) < 1:
        raise ConfigError("dp, tp, pp, ep, cp and micro_batch must be >= 1")
    if lo.cp > 1:
        if settings.seq_len % (2 * lo.cp):
            raise ConfigError(f"seq_len={settings.seq_len} must be a multiple of 2 x cp = {2 * lo.cp} (context "
                              "parallelism cuts each sequence into 2 x cp equal chunks)")
        if lo.gpus != gpus:
            raise ConfigError(f"dp*cp*tp*pp = {lo.dp}*{lo.cp}*{lo.tp}*{lo.pp} = {lo.gpus} ranks, but there are "
                              f"{gpus} GPUs; choose degrees whose product is {gpus}")
    if lo.gpus != gpus:
        raise ConfigError(f"dp*tp*pp = {lo.dp}*{lo.tp}*{lo.pp} = {lo.gpus} ranks, but there are {gpus} GPUs; "
                          f"choose dp, tp, pp whose product is {gpus}")
    for name, n in (("heads", model.num_heads), ("kv heads", model.num_kv_heads)):
        if n % lo.tp:
            raise ConfigError(f"tp={lo.tp} must divide the {n} {name} of {model.name}; valid tp: "
                              f"{', '.join(map(str, divisors(n)))}")
    if gpus_per_node is not None and lo.tp > gpus_per_node:
        raise ConfigError(f"tp={lo.tp} exceeds the {gpus_per_node} GPUs of a node (TP stays on NVLink)")
    if lo.ep > 1 and model.moe_layers == 0:
        raise ConfigError(f"{model.name} has no experts; ep must be 1")
    if model.n_routed_experts % lo.ep:
        raise ConfigError(f"ep={lo.ep} must divide the {model.n_routed_experts} routed experts; valid ep: "
                          f"{', '.join(map(str, divisors(model.n_routed_experts)))}")
    if (lo.dp * lo.tp) % lo.ep:
        raise ConfigError(f"ep={lo.ep} must divide dp*tp={lo.dp * lo.tp} (EP groups are carved out of DP x TP)")
    if lo.pp > model.num_layers:
        raise ConfigError(f"pp={lo.pp} exceeds the {model.num_layers} layers of {model.name}")
    if lo.schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {lo.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    if lo.schedule == "interleaved-1f1b":
        if lo.pp < 2 or lo.virtual_stages < 2:
            raise ConfigError(f"interleaved-1f1b needs pp >= 2 and virtual_stages >= 2, got pp={lo.pp}, "
                              f"virtual_stages={lo.virtual_stages}")
        if lo.pp * lo.virtual_stages > model.num_layers:
            raise ConfigError(f"pp x virtual_stages = {lo.pp * lo.virtual_stages} model chunks exceed the "
                              f"{model.num_layers} layers of {model.name}")
        if micro_batches(lo, settings) % lo.pp:
            raise ConfigError(f"interleaved-1f1b needs the micro-batches per step ({micro_batches(lo, settings)}) "
                              f"to be a multiple of pp={lo.pp} (Megatron's rule)")
    if lo.schedule == "dualpipe" and (lo.pp % 2 or lo.pp < 2):
        raise ConfigError(f"dualpipe needs an even pp >= 2, got pp={lo.pp}")
    if lo.schedule == "dualpipev":
        if lo.pp < 2:
            raise ConfigError(f"dualpipev needs pp >= 2, got pp={lo.pp}")
        if micro_batches(lo, settings) < 2 * lo.pp:  # torch's ScheduleDualPipeV: one per piece at least
            raise ConfigError(f"dualpipev needs at least 2 x pp = {2 * lo.pp} micro-batches per step, got "
                              f"{micro_batches(lo, settings)}")
    if lo.recompute not in RECOMPUTE:
        raise ConfigError(f"unknown recompute {lo.recompute!r}; choose one of: {', '.join(RECOMPUTE)}")
    if lo.zero not in (0, 1, 2, 3):
        raise ConfigError(f"zero must be 0, 1, 2 or 3, got {lo.zero}")
    per_step = lo.dp * lo.micro_batch
    if settings.global_batch % per_step:
        raise ConfigError(f"global batch {settings.global_batch} is not a multiple of dp*micro_batch = {per_step}")


def micro_batches(layout: Layout, settings: TrainSettings) -> int:
    return settings.global_batch // (layout.dp * layout.micro_batch)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def parse_layout(text: str) -> dict:
    """'dp=128,tp=1,pp=16,ep=64,zero=1,schedule=dualpipe' -> dict for Layout(**...)."""
    out: dict = {}
    names = {f for f in Layout.__dataclass_fields__}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in names:
            raise ConfigError(f"--layout expects KEY=VALUE pairs with keys {', '.join(names)}; got {item!r}")
        value = value.strip()
        if key in ("schedule", "recompute"):
            out[key] = value
        else:
            try:
                out[key] = int(value)
            except ValueError:
                raise ConfigError(f"--layout {key} must be an integer, got {value!r}") from None
    return out
