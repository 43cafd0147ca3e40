"""Acceptance: distributed runs of the trainer (`DistributedTrainer` in real gloo process groups) compute
what the plain single-process `Trainer` computes on the same global batch, step for step within 1e-5
(fp32): the loss parts, gradient norm, validation loss and expert counts it logs, and the weights of its
Hugging Face export; across resumes that change the layout on the way.

* 2 processes, one run resumed at every layout in turn: EP 2 (ZeRO-2), ZeRO-2, ZeRO-3, TP 2, PP 2 with
  1F1B, interleaved 1F1B and DualPipeV, then one process (DCP checkpoints reshard at each resume).
* 4 processes, by default: EP 2 x edp 2 with ZeRO-3, TP 2 x EP 2 x ZeRO-3 and PP 2 x dp 2, the same way.
* A step that is non-finite on one rank only is skipped on every rank, as the single process skips it
  (the reference run has a NaN loss at step 2, the layouts on one rank), and the run goes on.
* A stuck peer times out, and a dead one fails the others at once, each with one line naming it and
  the collective.
* DCP saves are atomic: fsynced, then renamed; a crash while replacing step-N keeps the old step-N,
  and a resume recovers from a crash's leftovers (a torn metrics line, a temporary folder).

Starting processes dominates the cost on a small machine, so each process group runs its runs in turn
(one thread per rank).
"""

import os
import shutil
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moeforge.checkpoint import list_checkpoints
from moeforge.cli import main
from moeforge.config import preset
from moeforge.errors import TrainingError
from moeforge.parallel import dist_checkpoint
from moeforge.parallel.launch import collective_errors
from parallel_helpers import (Loop, batches, build_model, check_same_run, fit_in_gloo_group, fit_single, one_thread,
                              read_metrics, train_config)

STEPS = 8
POISONED = {2}  # a NaN loss at step 2 (in the layouts: on one rank only): every rank skips that update
# One run, resumed at each layout for its steps (a DCP checkpoint at the end of each): (layout, last step).
TWO_RANK_CHAIN = [(dict(ep=2, zero=2), 1), (dict(zero=2, poison={1: POISONED}), 2), (dict(zero=3), 3),
                  (dict(tp=2), 4), (dict(pp=2, pp_schedule="1f1b"), 5), (dict(pp=2, pp_schedule="interleaved-1f1b"), 6),
                  (dict(pp=2, pp_schedule="dualpipev"), 7)]  # step 8: one process
FOUR_RANK_CHAIN = [(dict(ep=2, zero=3, poison={3: POISONED}), 2), (dict(tp=2, ep=2, zero=3), 3), (dict(pp=2), 4)]
# PP x EP and PP x TP, every schedule once: a single-process run's step-1 checkpoint continued at each layout in
# turn, then step 6 in one process again. Batch 8: interleaved 1F1B and DualPipeV at pp 2 x ep 2 need 4
# micro-batches of each dp rank's 4 rows.
PP_BATCH, PP_STEPS = 8, 6
PP_CHAIN = [(dict(pp=2, ep=2, pp_schedule="dualpipev"), 2), (dict(pp=2, tp=2, pp_schedule="interleaved-1f1b"), 3),
            (dict(pp=2, tp=2, pp_schedule="1f1b"), 4), (dict(pp=2, ep=2, pp_schedule="gpipe"), 5)]
PEER_TIMEOUT_S = 3


def chain_jobs(run_dir, chain):
    return [dict(run_dir=run_dir, steps=last, resume=i > 0, **layout) for i, (layout, last) in enumerate(chain)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The plain Trainer's run of STEPS steps (NaN loss at step 2), a checkpoint after each."""
    run = fit_single(tmp_path_factory.mktemp("single") / "run", steps=STEPS, poison_steps=POISONED, save_every=1)
    assert [m["skipped"] for m in read_metrics(run)] == [step in POISONED for step in range(1, STEPS + 1)]
    return run


def stall(rank, world, out_dir):
    """A stuck peer: rank 1 never joins an all-reduce on a group with a 3 s timeout; rank 0 records the
    error it gets and how long it took."""
    stuck = dist.new_group(backend="gloo", timeout=timedelta(seconds=PEER_TIMEOUT_S))
    if rank == 1:
        time.sleep(PEER_TIMEOUT_S * 2 + 1)  # past rank 0's timeout and its wait for the others to check in
    else:
        start = time.perf_counter()
        try:
            with collective_errors("step 7", PEER_TIMEOUT_S):
                dist.all_reduce(torch.ones(1), group=stuck)
            message = "no error"
        except TrainingError as e:
            message = str(e)
        torch.save({"elapsed": time.perf_counter() - start, "message": message}, os.path.join(out_dir, "stuck.pt"))
    dist.barrier()


def tp_shards_are_local(rank, world, out_dir):
    """TP 2 really splits heads, MLA up projections and the vocabulary (a run that matches the single
    process by not sharding anything would pass the comparisons too), and both ranks route every token to
    the same experts (the router reads the all-reduced residual stream)."""
    from torch.distributed.device_mesh import init_device_mesh

    from moeforge.balance import moe_modules
    from moeforge.config import preset
    from moeforge.model import Transformer
    from moeforge.parallel.tensor import apply_tensor_parallel

    torch.manual_seed(0)
    model = apply_tensor_parallel(Transformer(preset("debug")), init_device_mesh("cpu", (world,), mesh_dim_names=("tp",)))
    attn = model.layers[0].self_attn
    local = {"heads": attn.n_heads, "q_b_rows": attn.q_b_proj.weight.to_local().shape[0],
             "vocab_rows": model.embed_tokens.weight.to_local().shape[0]}
    tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    model(tokens, labels=tokens).loss.backward()
    routed = [m.tokens_per_expert.tolist() for m in moe_modules(model)]
    everyone = [None] * world
    dist.all_gather_object(everyone, routed)
    torch.save({**local, "same_routing": all(r == routed for r in everyone)},
               os.path.join(out_dir, f"tp-local-rank{rank}.pt"))


def fsdp_bf16_compute_copies(rank, world, out_dir):
    """parallelize(param_dtype=bf16) (a library option; the trainer uses autocast): the layers compute with
    bf16 copies, the sharded weights and their gradients stay fp32."""
    from moeforge.parallel import ParallelLayout, build_mesh, parallelize

    layout = ParallelLayout.resolve(world, ep=2, zero=3)
    model = parallelize(build_model(), layout, build_mesh(layout, "cpu"), param_dtype=torch.bfloat16)
    seen = set()
    model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, args: seen.add(m.weight.dtype))
    x, y = (t[rank * 2:(rank + 1) * 2] for t in batches(1)[0])  # this rank's half of the global batch
    loss = model(x, shift_labels=y).loss
    loss.backward()
    torch.save({"params": {p.dtype for p in model.parameters()}, "grads": {p.grad.dtype for p in model.parameters()
                                                                           if p.grad is not None},
                "compute": seen, "loss": loss.item()}, os.path.join(out_dir, f"bf16-rank{rank}.pt"))


def test_two_ranks_every_layout_resumed_in_turn_matches_single_process(tmp_path, reference):
    run = tmp_path / "chain"
    jobs = [*chain_jobs(run, TWO_RANK_CHAIN),
            tp_shards_are_local,
            fsdp_bf16_compute_copies,
            stall,
            dict(run_dir=tmp_path / "dead", steps=3, ep=2, zero=2, exit_at={1: 2}, dist_timeout=PEER_TIMEOUT_S)]
    fit_in_gloo_group(tmp_path, 2, jobs)

    # The last step in one process, from the DualPipeV run's DCP checkpoint.
    assert main(["train", "--resume", "--run-dir", str(run), "--steps", str(STEPS), "--pp", "1"]) == 0
    check_same_run(run, reference, "2 ranks: EP, ZeRO-2, ZeRO-3, TP, PP 1F1B / interleaved / DualPipeV, 1 process")

    cfg = preset("debug")
    for rank in range(2):
        assert torch.load(tmp_path / f"tp-local-rank{rank}.pt") == {
            "heads": cfg.num_attention_heads // 2, "q_b_rows": cfg.num_attention_heads // 2 * cfg.qk_head_dim,
            "vocab_rows": cfg.vocab_size // 2, "same_routing": True}
    bf16 = [torch.load(tmp_path / f"bf16-rank{rank}.pt") for rank in range(2)]
    assert all(r["params"] == r["grads"] == {torch.float32} and r["compute"] == {torch.bfloat16} for r in bf16)
    x, y = batches(1)[0]
    fp32_loss = build_model()(x, shift_labels=y).loss.item()
    assert abs(sum(r["loss"] for r in bf16) / 2 - fp32_loss) < 2e-2  # bf16 rounding: close, not equal
    assert read_metrics(run)[0]["ep_dispatch_bytes"] > 0  # the EP segment did exchange tokens

    stuck = torch.load(tmp_path / "stuck.pt")
    assert stuck["message"].startswith("rank 0 of 2: all_reduce failed during step 7: rank 1 did not answer "), \
        stuck["message"]
    assert PEER_TIMEOUT_S - 0.5 < stuck["elapsed"] < 2 * PEER_TIMEOUT_S + 10
    dead = (tmp_path / "error-rank0.txt").read_text()
    assert dead.startswith("rank 0 of 2: ") and "failed during step 2: rank 1 exited (" in dead, dead
    assert "\n" not in dead and "a collective failed" not in dead  # it names the collective (an FSDP all-gather)


def test_four_ranks_ep_x_fsdp_tp_x_ep_x_zero3_pp_x_dp_pp_x_ep_and_pp_x_tp_match_single_process(
        tmp_path, tmp_path_factory, reference):
    run, pp_run = tmp_path / "chain4", tmp_path / "pp_chain"
    pp_reference = fit_single(tmp_path_factory.mktemp("single8") / "run", steps=PP_STEPS, batch_size=PP_BATCH,
                              save_every=1)
    shutil.copytree(pp_reference, pp_run)  # resumed from its (single-process) step-1 checkpoint
    for ckpt in list_checkpoints(pp_run)[1:]:
        shutil.rmtree(ckpt)
    pp_jobs = [dict(run_dir=pp_run, steps=last, resume=True, batch_size=PP_BATCH, **layout) for layout, last in PP_CHAIN]
    fit_in_gloo_group(tmp_path, 4, [*chain_jobs(run, FOUR_RANK_CHAIN), *pp_jobs])
    check_same_run(run, reference, "4 ranks: EP 2 x edp 2 ZeRO-3, TP 2 x EP 2 x ZeRO-3, PP 2 x dp 2")

    # The PP x EP x DP checkpoint of step 5 continues in one process.
    assert main(["train", "--resume", "--run-dir", str(pp_run), "--steps", str(PP_STEPS), "--nproc", "1", "--pp", "1",
                 "--ep", "1"]) == 0
    check_same_run(pp_run, pp_reference, "1 process -> PP 2 x EP 2 DualPipeV -> PP 2 x TP 2 interleaved 1F1B -> "
                                         "PP 2 x TP 2 1F1B -> PP 2 x EP 2 GPipe -> 1 process")
    # Each segment ran at its layout (a trainer ignoring a flag would match too), and EP exchanged tokens.
    for layout, last in PP_CHAIN:
        extra = torch.load(pp_run / "checkpoints" / f"step-{last:06d}" / "extra.pt")
        ran = {**{k: extra["layout"][k] for k in ("pp", "ep", "tp")}, "pp_schedule": extra["train_config"]["pp_schedule"]}
        assert ran == {"ep": 1, "tp": 1, **layout}, (last, ran)
    metrics = {m["step"]: m for m in read_metrics(pp_run)}
    assert metrics[2]["ep_dispatch_bytes"] > 0 and metrics[5]["ep_dispatch_bytes"] > 0


def test_distributed_checkpoints_are_atomic_and_resume_after_a_crash(tmp_path, monkeypatch):
    """A DCP save (here a 1-process group) fsyncs every file and the folder before renaming it into place;
    saving step N again over an existing step-N keeps the old one until the new one is in place; a resume
    recovers from what a crash leaves behind."""
    from moeforge.parallel.trainer import DistributedTrainer

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.path.realpath(f"/proc/self/fd/{fd}")),
                                                 real_fsync(fd))[1])
    with one_thread():
        try:
            trainer = DistributedTrainer(train_config(tmp_path / "run", steps=1, eval_every=0))
            trainer.fit()
            ckpt = tmp_path / "run" / "checkpoints" / "step-000001"
            files = {str(p) for p in ckpt.iterdir()}
            assert {"model.safetensors", "extra.pt", ".metadata"} <= {Path(p).name for p in files}
            published = {p.replace("/.tmp-step-000001/", "/step-000001/") for p in synced}
            assert files <= published, files - published
            assert str(ckpt.parent) in synced  # the rename itself

            before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
            real_rename = Path.rename

            def crash_on_publish(self, target):  # the new folder's rename into place fails once
                if self.name.startswith(".tmp-") and Path(target).name == "step-000001":
                    raise OSError("power lost")
                return real_rename(self, target)

            monkeypatch.setattr(Path, "rename", crash_on_publish)
            with pytest.raises(OSError, match="power lost"):
                trainer.save()
            monkeypatch.setattr(Path, "rename", real_rename)
            assert ckpt.is_dir(), "the previous step-000001 was deleted before the new one was in place"
            assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before

            # A harder crash (power lost between moving step-1 aside and the rename, a half-written folder of
            # the next save, a torn last metrics line): the resume puts step-1 back, removes the rest, goes on.
            ckpt.rename(ckpt.parent / ".old-step-000001-999")
            (ckpt.parent / ".tmp-step-000002").mkdir()
            with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
                f.write('{"step": 2, "loss": 7.1')
            DistributedTrainer(train_config(tmp_path / "run", steps=2, eval_every=0), resume=True).fit()
            assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2]
            assert sorted(p.name for p in ckpt.parent.iterdir()) == ["step-000001", "step-000002"]
        finally:
            dist.destroy_process_group()


def test_checkpoints_with_unflattened_optimizer_state_still_load(tmp_path):
    """Checkpoints are saved with the optimizer state flattened (per-parameter keys: pipeline stages hold
    different parameters); one written before, with per-group parameter lists, loads the same."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from moeforge.parallel.launch import init_distributed

    with one_thread():
        init_distributed("gloo", 60)
        try:
            saved = Loop(build_model())
            saved.train_step(*batches(1)[0])
            model_sd, optim_sd = get_state_dict(saved.model, saved.optimizer)  # the old, unflattened layout
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path / "old"))
            dist_checkpoint.save(tmp_path / "new", saved.model, saved.optimizer)
            for name in ("old", "new"):
                fresh = Loop(build_model())
                dist_checkpoint.load(tmp_path / name, fresh.model, fresh.optimizer)
                got, want = fresh.optimizer.state_dict(), saved.optimizer.state_dict()
                assert got["param_groups"] == want["param_groups"], name
                for i, s in want["state"].items():
                    for k, v in s.items():
                        assert torch.equal(got["state"][i][k], v), (name, i, k)
                assert all(torch.equal(a, b) for a, b in zip(fresh.model.state_dict().values(),
                                                            saved.model.state_dict().values()))
        finally:
            dist.destroy_process_group()
