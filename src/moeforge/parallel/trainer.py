"""`Trainer` for one rank of a distributed run (started by torchrun; see docs/distributed.md).

What changes against the single-process trainer, and why:
* the model is parallelised after it is built (`parallelize`), before the optimizer sees it;
* each data-parallel rank trains on its slice of the same global batch, so the global batch (and with
  equal token counts per rank, the loss and gradients) equal a single-process run's;
* the logged loss is the mean over dp ranks (the global loss); expert counts and the balancing bias
  use counts summed over the dp group;
* only rank 0 prints, writes metrics and the run folder; everyone writes its checkpoint shards (DCP),
  and rank 0 adds a Hugging Face export of the weights to each checkpoint folder;
* every step runs inside `collective_errors`, so a dead or stuck peer ends the run with one message;
* with --redundant-experts, `self.redundant` (rebalance.py) syncs the slots' gradients in clip_gradients,
  re-places experts after the step, and maps checkpoints and the export to the logical layout.

Pipeline parallelism (--pp P, --nproc P x dp): every rank builds the whole model from the same seed and
keeps its stage(s) (`build_pipeline`); `self.model` is then this rank's `PipelineRank` (full-model
parameter names), and each optimizer step runs this dp rank's slice of the global batch through the
schedule in --pp-microbatches micro-batches. With dp > 1 each pipeline rank is replicated over its dp group
(gradients averaged by one all-reduce after the schedule, no ZeRO sharding). Loss (summed over stages,
mean over dp), gradient norm (over all stages, of the dp-averaged gradients), expert counts (all layers,
summed over dp) and the validation loss (a forward-only pass through the stages, mean over dp) are the
whole model's on every rank; checkpoints are DCP shards per stage (dp replicas write them once) plus a
Hugging Face export of the weights gathered on rank 0.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console

from .. import hardware
from ..checkpoint import checkpoints_dir, latest_checkpoint, list_checkpoints, publish
from ..config import RunConfig
from ..errors import CheckpointError, ConfigError
from ..model_card import training_facts
from ..train import Trainer, decay_split, default_run_dir, resolve_run_precision
from . import dist_checkpoint, parallelize
from .context import ContextParallelRouterProbe
from .expert import pop_comm_bytes
from .grads import clip_grad_norm
from .launch import collective_errors, init_distributed, register_process
from .mesh import ParallelLayout, build_mesh
from .pipeline import PipelineRank, build_pipeline
from .rebalance import RedundantExperts, initial_placement
from .tensor import full_tensor, split_param_groups


def is_distributed_checkpoint(ckpt: Path | None) -> bool:
    return ckpt is not None and (Path(ckpt) / ".metadata").is_file()


class DataParallelSlice:
    """A batch source whose batch i is this dp rank's rows of the global batch i."""

    def __init__(self, batches, rank: int, size: int):
        self.batches, self.rank, self.size = batches, rank, size

    def batch(self, index: int):
        x, y = self.batches.batch(index)
        rows = x.shape[0] // self.size
        return x[self.rank * rows:(self.rank + 1) * rows], y[self.rank * rows:(self.rank + 1) * rows]


class DistributedTrainer(Trainer):
    redundant: RedundantExperts | None = None  # --redundant-experts: the slots, their gradients and moves

    def __init__(self, run: RunConfig, run_dir: Path | str | None = None, resume: bool = False,
                 console: Console | None = None, allow_config_change: tuple[str, ...] | str = ()):
        cfg = run.train
        caps = hardware.probe(cfg.device)
        self.rank, self.world = init_distributed(caps.dist_backend, cfg.dist_timeout)
        register_process()  # lets a failed collective's message tell which peer exited
        if caps.device.startswith("cuda") and self.world > 1:  # one GPU per rank
            cuda = f"cuda:{torch.cuda.current_device()}"
            run = dataclasses.replace(run, train=dataclasses.replace(cfg, device=cuda))
        self.layout = ParallelLayout.resolve(self.world, cfg.dp, cfg.ep, cfg.tp, cfg.pp, cfg.zero, cfg.cp)
        self.layout.check_model(run.model).check_batch(cfg.batch_size).check_trainer().check_pipeline(cfg)
        self.layout.check_context(cfg)
        self.pipeline = None  # built in parallelize when pp > 1
        self.mesh = build_mesh(self.layout, "cuda" if caps.device.startswith("cuda") else "cpu")
        # Losses, expert counts and the bias update span the ranks of one global batch: dp (x cp).
        self.dp_group = self.mesh["dp_cp"].get_group()
        self.dp_rank = self.mesh["dp"].get_local_rank()
        self.is_main = self.rank == 0
        # Every rank must use rank 0's run folder (default names carry a timestamp).
        chosen = [str(run_dir or cfg.run_dir or default_run_dir(cfg.preset))]
        dist.broadcast_object_list(chosen, src=0)
        # ... and rank 0's precision: `auto` must not resolve differently on two ranks (or machines).
        precision = [resolve_run_precision(run, caps, Path(chosen[0]), resume).train.precision]
        dist.broadcast_object_list(precision, src=0)
        run = dataclasses.replace(run, train=dataclasses.replace(run.train, precision=precision[0]))
        # The FP8 policy's statistics, reduced over the ranks holding the same modules (all but pipeline stages).
        self.policy_reduce_max = self._reduce_max
        console = console or Console(stderr=True, quiet=not self.is_main)
        super().__init__(run, run_dir=chosen[0], resume=resume, console=console,
                         allow_config_change=allow_config_change)
        if self.layout.cp > 1:  # each rank's routers see its share of every sequence
            self.router_probe.remove()
            self.router_probe = ContextParallelRouterProbe(self.model, self.model.context_parallel, cfg.seq_aux_alpha,
                                                           cfg.batch_aux_alpha, seq_len=cfg.seq_len)
        self.train_batches = DataParallelSlice(self.train_batches, self.dp_rank, self.layout.dp)
        self.val_batches = DataParallelSlice(self.val_batches, self.dp_rank, self.layout.dp)
        self.console.print(f"  distributed: {self.world} processes, {self.layout.describe()}, "
                           f"{dist.get_backend()} collectives, timeout {cfg.dist_timeout:g} s")
        if self.pipeline is not None:
            self.console.print(f"  pipeline: {cfg.pp_schedule} schedule, {len(self.pipeline.stage_ranks)} stages, "
                               f"{self.pipeline.n_microbatches} micro-batches of "
                               f"{self.pipeline.batch_shape[0] // self.pipeline.n_microbatches} sequences per step")

    # --- hooks of Trainer ---------------------------------------------------------------------------
    @property
    def micro_batch_rows(self) -> int:
        return self.cfg.batch_size // self.layout.dp

    def parallelize(self, model):
        # On 2-D meshes (EP x FSDP expert shards, TP x FSDP norms) DTensor warns, on every step and save, that
        # it reduces one mesh dim after the other; that is the expected cost here, not a problem to report.
        logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
        placement = initial_placement(self.run.model, self.layout.ep, self.cfg.redundant_experts) \
            if self.cfg.redundant_experts else None
        model = parallelize(model, self.layout, self.mesh, ep_dispatch=self.cfg.ep_dispatch,
                            ep_overlap_shared=self.cfg.ep_overlap_shared, expert_placement=placement)
        if placement is not None:
            self.redundant = RedundantExperts(model, self.mesh, self.layout, self.cfg, self.run.model)
        if self.layout.pp == 1:
            return model
        return self._build_pipeline(model)

    def _build_pipeline(self, model) -> PipelineRank:
        """Cut the (identically initialised) model into this rank's stages. The trainer's RouterProbe is
        built on the returned module afterwards; each stage pops it at the end of its forward, so the balance
        loss of a micro-batch's routers joins that micro-batch's backward (see pipeline.attach_aux_loss)."""
        cfg = self.cfg
        self._moe_layer_ids = [i for i, _ in model.moe_layers()]
        self._full_optimizer_names = [n for names in decay_split(model) for n in names]  # a plain run's order
        total = model.num_parameters()
        rows = cfg.batch_size * cfg.grad_accum // self.layout.dp
        self.pipeline = build_pipeline(model, self.mesh["pp"], (rows, cfg.seq_len),
                                       self.layout.pipeline_microbatches(cfg), cfg.pp_schedule,
                                       aux_loss_factory=lambda stage: lambda: self.router_probe.pop_loss(),
                                       dp_group=self.dp_group,
                                       expert_dp_group=self.mesh["edp"].get_group() if self.layout.ep > 1 else None)
        self.pp_group = self.mesh["pp"].get_group()
        rank_module = self.pipeline.rank_module()
        rank_module.full_model_parameters = total
        return rank_module

    def build_optimizer(self):
        optimizer = super().build_optimizer()
        if self.layout.tp > 1 or self.pipeline is not None or self.redundant is not None:  # fused/foreach kernels
            # refuse to mix plain tensors and DTensors (TP shards; EP expert shards beside the plain dense weights
            # of pipeline stages; plain redundant expert slots beside FSDP's DTensors)
            optimizer = type(optimizer)(split_param_groups(optimizer.param_groups))
        return optimizer

    def clip_gradients(self, params, max_norm):
        if self.pipeline is not None:  # the norm over every stage (and the shared embedding once)
            return self.pipeline.clip_grad_norm_(max_norm)
        if self.redundant is not None:  # slots get their logical experts' gradients; each expert counted once
            return self.redundant.sync_and_clip(params, max_norm)
        return clip_grad_norm(params, max_norm)

    def train_step(self) -> dict:
        with collective_errors(f"step {self.step + 1}", self.cfg.dist_timeout):
            pop_comm_bytes(self.model)  # evaluation's exchanges are not this step's
            if self.redundant is not None:
                self.redundant.start_step()
            m = super().train_step()
            if self.layout.ep > 1:
                m.update(self._comm_bytes())
            if self.redundant is not None:  # rows per EP rank; every K steps, re-place the experts
                m.update(self.redundant.after_step(self.step + 1, self.optimizer, self.console))
            return self._mean_over_dp(m, ("loss", "lm_loss", "mtp_loss", "aux_loss"))

    def step_is_finite(self, loss: float, grad_norm) -> bool:
        """Skip a step on every rank if any rank saw a non-finite loss or gradient."""
        ok = torch.tensor([float(super().step_is_finite(loss, grad_norm))], device=self.device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def _reduce_max(self, table: torch.Tensor) -> torch.Tensor:
        group = self.dp_group if self.pipeline is not None else None
        table = table.to(self.device)
        dist.all_reduce(table, op=dist.ReduceOp.MAX, group=group)
        return table.cpu()

    def _comm_bytes(self) -> dict:
        """Bytes the EP all-to-alls of this step's forward passes sent between ranks, summed over ranks."""
        sent = pop_comm_bytes(self.model)
        values = torch.tensor([sent["dispatch"], sent["combine"]], dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        return {"ep_dispatch_bytes": int(values[0]), "ep_combine_bytes": int(values[1])}

    @torch.no_grad()
    def evaluate(self) -> float:
        with collective_errors(f"evaluation after step {self.step}", self.cfg.dist_timeout):
            value = super().evaluate()
            return self._mean_over_dp({"v": value}, ("v",))["v"]

    # --- pipeline parallelism -----------------------------------------------------------------------
    def forward_backward(self) -> dict:
        """With the pipeline: the grad_accum batches of this step, concatenated, run through the schedule in
        micro-batches; the loss parts of the whole model on every rank."""
        if self.pipeline is None:
            return super().forward_backward()
        cfg = self.cfg
        parts = [self.train_batches.batch(self.step * cfg.grad_accum + micro) for micro in range(cfg.grad_accum)]
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        with self.autocast():
            self.pipeline.step(x.to(self.device), y.to(self.device))
        return dict(self.pipeline.metrics)

    def expert_counts(self) -> torch.Tensor:
        return super().expert_counts() if self.pipeline is None else self._pipeline_counts()

    def _pipeline_counts(self) -> torch.Tensor:
        """[moe layers of the whole model, experts] token counts: each stage fills its layers' rows."""
        here = dict(self.model.moe_layers())
        if not self._moe_layer_ids:
            return torch.zeros(0, 0)
        counts = torch.zeros(len(self._moe_layer_ids), self.run.model.n_routed_experts, device=self.device)
        for row, layer in enumerate(self._moe_layer_ids):
            if layer in here:
                counts[row] = here[layer].tokens_per_expert
        dist.all_reduce(counts, group=self.dp_group)
        dist.all_reduce(counts, group=self.pp_group)
        return counts.cpu()

    def validation_loss(self, x, y) -> float:
        if self.pipeline is None:
            return super().validation_loss(x, y)
        return self.pipeline.forward_loss(x, y).item()  # forward only through the stages, each batch whole

    def _gather_full_state(self) -> dict | None:
        """The whole model's state dict (CPU tensors) on rank 0, from every stage; None on other ranks."""
        local = {k: full_tensor(v).detach().cpu() for k, v in self.model.state_dict().items()
                 if not k.startswith(PipelineRank.LAST_STAGE_COPY + ".")}  # TP / EP shards gathered first
        gathered = [None] * self.world if self.is_main else None
        dist.gather_object(local, gathered, dst=0)
        if not self.is_main:
            return None
        full: dict = {}
        for part in gathered:
            for k, v in part.items():
                full.setdefault(k, v)  # the embedding (on the first and last stage) is the same on both
        return full

    def sample(self, prompt: str, max_new_tokens: int | None = None) -> str:
        if self.pipeline is None:
            return super().sample(prompt, max_new_tokens)
        from ..generate import generate
        from ..model import Transformer

        full = self._gather_full_state()  # every rank takes part; rank 0 samples from the whole model
        if not self.is_main:
            return ""
        with torch.device("meta"):
            model = Transformer(self.run.model)
        model.to_empty(device=self.device)
        model.load_state_dict(full, strict=True)
        model.rotary.reset()
        ids = self.tokenizer.encode(prompt)
        stop = (self.tokenizer.eos_id,) if self.tokenizer.eos_id is not None else ()
        new = generate(model.eval(), ids, max_new_tokens or self.cfg.sample_tokens, temperature=0.8,
                       top_k=50, seed=self.cfg.seed, stop_ids=stop, autocast_dtype=self.amp_dtype)
        return prompt + self.tokenizer.decode(new)

    def _mean_over_dp(self, metrics: dict, keys) -> dict:
        keys = [k for k in keys if k in metrics]
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(values, group=self.dp_group)
        size = dist.get_world_size(self.dp_group)
        return {**metrics, **{k: float(v) / size for k, v in zip(keys, values.tolist())}}

    # --- run folder and checkpoints -----------------------------------------------------------------
    def _start_run_dir(self) -> None:
        error = None
        if self.is_main:
            try:
                super()._start_run_dir()
            except (ConfigError, CheckpointError) as e:  # e.g. a folder whose checkpoints are all corrupt
                error = str(e)
        flag = [error]
        dist.broadcast_object_list(flag, src=0)
        if flag[0]:
            raise ConfigError(flag[0])

    def _resume(self) -> None:
        if self.is_main:  # crashed saves' temporaries (checkpoint.remove_stale_temporaries)
            self._remove_stale_temporaries()
        dist.barrier()
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            raise ConfigError(f"--resume: no checkpoint in {self.run_dir}")
        if is_distributed_checkpoint(ckpt):
            extra = dist_checkpoint.load(ckpt, self.model, self.optimizer, alias=saved_name, view=self.redundant)
        else:
            extra = self._load_single_process_checkpoint(ckpt)
        self._restore_state(extra)
        if self.redundant is not None:
            self.redundant.restore(extra, self.optimizer)
        if self.is_main:
            self._continue_run_files()
        self.console.print(f"resuming {self.run_dir} from step {self.step} ({self.world} processes)")

    def _load_single_process_checkpoint(self, ckpt: Path) -> dict:
        """A checkpoint of the plain Trainer (Hugging Face weights + torch optimizer state) into the
        parallelised model: every rank reads the full tensors and keeps its shards."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        from ..checkpoint import load_trainer_state
        from ..hf import hf_to_moeforge, read_safetensors

        state = load_trainer_state(ckpt)
        weights = hf_to_moeforge(read_safetensors(ckpt), self.run.model)
        # torch numbers parameters by their order in the param groups; DCP's state dicts use names. Under pp the
        # plain run numbered the whole model's parameters and this rank holds some of them (DualPipeV's rank 0
        # also a second embedding, which takes the first one's values).
        name_of = {id(p): n for n, p in self.model.named_parameters()}
        names = [name_of[id(p)] for group in self.optimizer.param_groups for p in group["params"]]
        # (The plain run's order is decay_split's; this optimizer's groups may be split by tensor kind.)
        order = [n for part in decay_split(self.model) for n in part] if self.pipeline is None \
            else self._full_optimizer_names
        holders: dict[str, list[str]] = {}  # saved name -> this rank's names holding it
        for n in names:
            holders.setdefault(saved_name(n), []).append(n)
        if self.pipeline is not None:
            weights = {k: weights[saved_name(k)] for k in self.model.state_dict()}
        saved = state["optimizer"]
        try:
            if self.redundant is not None:  # the full logical experts -> this rank's slots
                optim_state = {n: dict(v) for i, v in saved["state"].items() for n in [order[i]]}
                self.redundant.full_to_slots(weights, optim_state)
                saved = {**saved, "state": {i: optim_state[order[i]] for i in saved["state"]}}
            optim = {"state": {n: v if j == 0 else copy.deepcopy(v)  # copies must not share moment tensors
                               for i, v in saved["state"].items() for j, n in enumerate(holders.get(order[i], []))},
                     "param_groups": [{**g, "params": [n for i in g["params"] for n in holders.get(order[i], [])]}
                                      for g in saved["param_groups"]]}
            set_state_dict(self.model, self.optimizer, model_state_dict=weights, optim_state_dict=optim,
                           options=StateDictOptions(full_state_dict=True))
        except (IndexError, KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{ckpt}: does not match this model ({type(e).__name__}: {e})") from None
        return state

    def save(self) -> Path:
        """DCP shards + extra.pt + (rank 0) a Hugging Face export, into checkpoints/step-N, atomically: all
        ranks write into a temporary folder, and rank 0 publishes it once every rank is done (as the
        single-process save does: fsync, rename)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        base = checkpoints_dir(self.run_dir)
        final, tmp = base / f"step-{self.step:06d}", base / f".tmp-step-{self.step:06d}"
        if self.is_main:
            base.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        extra = {**self._state(), "layout": dataclasses.asdict(self.layout)}
        if self.redundant is not None:
            extra["expert_placement"] = self.redundant.extra_state()
        with collective_errors(f"checkpoint at step {self.step}", self.cfg.dist_timeout):
            dist_checkpoint.save(tmp, self.model, self.optimizer, extra, view=self.redundant)
            if self.pipeline is not None:
                full = self._gather_full_state()
            else:
                full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                                  cpu_offload=True))
            if self.redundant is not None:  # the export holds the logical experts, as without redundancy
                full.update({k: v.cpu() for k, v in self.redundant.logical_weights().items()})
        if self.is_main:
            export_hf(full, self.run.model, tmp, card=training_facts(self))
            publish(tmp, final)  # fsync, then rename (the previous step-N goes only once this one is in)
            for stale in list_checkpoints(self.run_dir)[:-self.cfg.keep_checkpoints]:
                shutil.rmtree(stale, ignore_errors=True)
        dist.barrier()
        return final


def saved_name(name: str) -> str:
    """The full model's name of a parameter or buffer of this rank (DualPipeV's last-stage embedding copy
    is the embedding); also for state-dict keys holding the name (`state.<name>.exp_avg`)."""
    return name.replace(PipelineRank.LAST_STAGE_COPY + ".", "embed_tokens.")


def export_hf(state: dict, config, folder: Path, card: dict | None = None) -> None:
    """Write the gathered full weights as a Hugging Face folder (what `moeforge generate` reads)."""
    from ..hf import save_pretrained
    from ..model import Transformer

    with torch.device("meta"):
        plain = Transformer(config)
    plain.load_state_dict(state, strict=True, assign=True)
    save_pretrained(plain, folder, card=card)
