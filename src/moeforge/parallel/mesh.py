"""The parallel layout of a run and the device mesh built from it.

Degrees: pp (pipeline stages) x dp (data parallel: ranks that see different tokens) x tp (tensor
parallel) = world size. Expert parallelism reuses the data-parallel ranks, as in DeepSeek-V3, Megatron
and torchtitan: the dp ranks are split into ep groups that hold different experts and exchange tokens
with an all-to-all, so ep must divide dp; edp = dp / ep ranks hold the same experts (their expert
gradients are averaged over that "expert data-parallel" group).

Mesh dimensions, outermost first: ("pp", "edp", "ep", "tp"), with "dp" = ("edp", "ep") flattened
(with context parallelism ("pp", "edp", "cp", "ep", "tp"): see ParallelMesh).
Ranks in one tp group are neighbours (fastest links), then ep, then edp, then pp.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import PP_SCHEDULES, ZERO_1_REFUSED, ModelConfig, TrainConfig
from ..errors import ConfigError

ZERO_LEVELS = (2, 3)


@dataclass(frozen=True)
class ParallelLayout:
    """Parallel degrees of a run (the `--dp/--ep/--tp/--pp/--zero` flags, documented in TrainConfig).

    zero: 3 = FSDP2 resharding parameters after forward (ZeRO-3); 2 = keep them gathered from
    forward to backward (ZeRO-2: gradients and optimizer state sharded). 1 is refused: FSDP2 shards
    gradients together with optimizer state and has no optimizer-state-only mode.
    """

    dp: int = 1
    ep: int = 1
    tp: int = 1
    pp: int = 1
    zero: int = 2
    cp: int = 1  # context parallelism: ranks sharing each sequence (parallel/context.py)

    @property
    def world_size(self) -> int:
        return self.dp * self.cp * self.tp * self.pp

    @property
    def edp(self) -> int:
        """Ranks holding the same experts (expert data-parallel degree)."""
        return self.dp // self.ep

    @property
    def reshard_after_forward(self) -> bool:
        return self.zero == 3

    @classmethod
    def resolve(cls, world_size: int, dp: int = 0, ep: int = 1, tp: int = 1, pp: int = 1,
                zero: int = 2, cp: int = 1) -> "ParallelLayout":
        """Fill in dp = world / (cp x tp x pp) when dp is 0 ("auto"), then check against world_size."""
        for name, value in (("ep", ep), ("tp", tp), ("pp", pp), ("cp", cp)):
            if int(value) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {value}")
        if dp == 0:
            if world_size % (cp * tp * pp):
                names, values = ("cp x tp x pp", (cp, tp, pp)) if cp > 1 else ("tp x pp", (tp, pp))
                raise ConfigError(f"{names} = {' x '.join(map(str, values))} = {cp * tp * pp} does not divide the "
                                  f"{world_size} processes")
            dp = world_size // (cp * tp * pp)
        layout = cls(dp=int(dp), ep=int(ep), tp=int(tp), pp=int(pp), zero=int(zero), cp=int(cp))
        return layout.check_world(world_size)

    def check_world(self, world_size: int) -> "ParallelLayout":
        if self.dp < 1:
            raise ConfigError(f"--dp must be >= 1 (or 0 = auto), got {self.dp}")
        if self.world_size != world_size:
            names, values = ("dp x cp x tp x pp", (self.dp, self.cp, self.tp, self.pp)) if self.cp > 1 else \
                ("dp x tp x pp", (self.dp, self.tp, self.pp))
            raise ConfigError(f"{names} = {' x '.join(map(str, values))} = {self.world_size} must equal "
                              f"the number of processes ({world_size})")
        if self.dp % self.ep:
            raise ConfigError(f"ep={self.ep} must divide dp={self.dp}: expert parallelism reuses the "
                              "data-parallel ranks")
        if self.zero == 1:
            raise ConfigError(ZERO_1_REFUSED)
        if self.zero not in ZERO_LEVELS:
            raise ConfigError(f"--zero must be 2 or 3, got {self.zero}")
        return self

    def check_model(self, config: ModelConfig) -> "ParallelLayout":
        """Raise ConfigError naming the first degree this model cannot be split by."""
        if self.ep > 1:
            if config.num_moe_layers == 0:
                raise ConfigError(f"ep={self.ep}, but the model has no MoE layers to split")
            if config.n_routed_experts % self.ep:
                raise ConfigError(f"ep={self.ep} must divide n_routed_experts={config.n_routed_experts}")
        if config.num_attention_heads % self.tp:
            raise ConfigError(f"tp={self.tp} must divide num_attention_heads={config.num_attention_heads}")
        if self.pp > config.num_hidden_layers:
            raise ConfigError(f"pp={self.pp} exceeds num_hidden_layers={config.num_hidden_layers} "
                              "(every stage needs at least one layer)")
        return self

    def check_batch(self, batch_size: int) -> "ParallelLayout":
        if batch_size % self.dp:
            raise ConfigError(f"batch_size={batch_size} must be a multiple of dp={self.dp} (each data-parallel "
                              "rank takes an equal share of the global batch)")
        return self

    def check_trainer(self) -> "ParallelLayout":
        """What `moeforge train` runs: dp x ep x tp with ZeRO-2/3, or pipeline stages combined with any of dp,
        ep and tp (pp x dp x ep x tp; stages replicated over their dp ranks, no ZeRO sharding of stages)."""
        if self.pp > 1 and self.dp > 1 and self.zero == 3:
            raise ConfigError(f"--zero 3 with pp={self.pp} x dp={self.dp}: pipeline stages are not sharded (ZeRO-3 "
                              "of stages is not implemented: FSDP2 units would not cover the last stage's head, MTP "
                              "and loss, run outside its forward; stages are replicated over dp, gradients "
                              "all-reduced); drop --zero 3")
        return self

    def check_context(self, cfg: TrainConfig) -> "ParallelLayout":
        """Raise ConfigError naming the first setting context parallelism is not built for (nothing at cp = 1)."""
        if self.cp == 1:
            return self
        others = [f"{name}={value}" for name, value in (("pp", self.pp),) if value > 1]
        if others:
            raise ConfigError(f"cp={self.cp} with {', '.join(others)}: context parallelism composes with data, expert "
                              "and tensor parallelism only (--nproc dp x cp x tp, ep dividing dp); with pipeline "
                              "stages it is not implemented")
        if cfg.seq_len % (2 * self.cp):
            raise ConfigError(f"seq_len={cfg.seq_len} must be a multiple of 2 x cp = {2 * self.cp}: context "
                              "parallelism cuts each sequence into 2 x cp equal chunks (padding is not supported)")
        why = {"--activation-checkpointing": " (its recompute runs in backward, outside the context-parallel forward "
                                             "that makes MLA attend over the gathered KV, and selective/auto regions "
                                             "are not called by that attention)"}
        for flag, on in (("--compile", cfg.compile), ("--activation-checkpointing", cfg.activation_checkpointing != "none"),
                         ("--offload", cfg.offload != "none")):
            if on:
                raise ConfigError(f"{flag} is not applied with context parallelism{why.get(flag, '')}; drop it, "
                                  "or use --cp 1")
        return self

    def pipeline_microbatches(self, cfg: TrainConfig) -> int:
        """Micro-batches per optimizer step: --pp-microbatches, or one per pipeline stage."""
        return cfg.pp_microbatches or self.pp * PP_SCHEDULES[cfg.pp_schedule]

    def check_pipeline(self, cfg: TrainConfig) -> "ParallelLayout":
        """Raise ConfigError naming the first pipeline setting the trainer cannot run (nothing when pp = 1)."""
        if self.pp == 1:
            return self
        n, stages = self.pipeline_microbatches(cfg), self.pp * PP_SCHEDULES[cfg.pp_schedule]
        rows = cfg.batch_size * cfg.grad_accum // self.dp
        if rows % n:
            raise ConfigError(f"pp_microbatches={n} must divide the {rows} sequences a pipeline runs per step "
                              "(batch_size x grad_accum / dp)")
        if stages > self.pp and n < stages:
            raise ConfigError(f"pp_schedule {cfg.pp_schedule} runs {stages} stages and needs at least {stages} "
                              f"micro-batches, got pp_microbatches={n}")
        for flag, on in (("--compile", cfg.compile), ("--activation-checkpointing", cfg.activation_checkpointing != "none"),
                         ("--memory-budget", cfg.memory_budget is not None), ("--offload", cfg.offload != "none")):
            if on:
                raise ConfigError(f"{flag} is not applied to pipeline stages; drop it, or use --pp 1")
        return self

    def describe(self) -> str:
        return (f"dp {self.dp} (ep {self.ep} x edp {self.edp}), {f'cp {self.cp}, ' if self.cp > 1 else ''}"
                f"tp {self.tp}, pp {self.pp}, {self.sharding()}")

    def sharding(self) -> str:
        """What --zero does in this layout, in words: pipeline stages are replicated over dp (not sharded),
        and one data-parallel rank has nothing to shard over."""
        if self.dp * self.cp == 1:
            return f"zero {self.zero} (nothing to shard: one data-parallel rank)"
        if self.pp > 1:
            return "no ZeRO sharding (pipeline stages replicated over dp, gradients all-reduced)"
        return f"zero {self.zero}"


class ParallelMesh:
    """The run's DeviceMesh with dims ("pp", "edp", "ep", "tp"), plus "dp" = edp x ep flattened.

    `mesh[name]` gives the 1-D sub-mesh of any of those names (torch asks callers to keep the flattened
    mesh themselves rather than slice it from the root). With context parallelism the root has a "cp" dim
    between "edp" and "ep", "dp_cp" = dp x cp flattened: the ranks that average gradients (FSDP's mesh),
    and "edp_cp" = edp x cp: the ranks holding the same experts; without, they are "dp" and "edp".
    """

    def __init__(self, root, dp, dp_cp=None, edp_cp=None):
        self.root, self.dp, self.dp_cp, self.edp_cp = root, dp, dp_cp or dp, edp_cp

    def __getitem__(self, name: str):
        if name in ("dp", "dp_cp"):
            return getattr(self, name)
        if name == "edp_cp":  # the ranks holding the same experts: edp, x cp (each sees a share of every sequence)
            return self.edp_cp if self.edp_cp is not None else self.root["edp"]
        return self.root[name]

    def __repr__(self) -> str:
        return f"ParallelMesh({self.root})"


def build_mesh(layout: ParallelLayout, device_type: str = "cpu") -> ParallelMesh:
    """Needs an initialised default process group whose size is layout.world_size."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise ConfigError("build_mesh needs torch.distributed to be initialised (run under torchrun)")
    layout.check_world(dist.get_world_size())
    if layout.cp == 1:
        root = init_device_mesh(device_type, (layout.pp, layout.edp, layout.ep, layout.tp),
                                mesh_dim_names=("pp", "edp", "ep", "tp"))
        return ParallelMesh(root, root["edp", "ep"]._flatten("dp"))  # _flatten: as torchtitan does
    # cp before ep: the experts' FSDP mesh (edp x cp) then precedes their ep mesh, the order DTensor's
    # reductions over both need (flattening mesh dims out of order is refused).
    root = init_device_mesh(device_type, (layout.pp, layout.edp, layout.cp, layout.ep, layout.tp),
                            mesh_dim_names=("pp", "edp", "cp", "ep", "tp"))
    return ParallelMesh(root, root["edp", "ep"]._flatten("dp"), root["edp", "cp", "ep"]._flatten("dp_cp"),
                        root["edp", "cp"]._flatten("edp_cp"))
