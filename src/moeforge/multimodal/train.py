"""`moeforge train --multimodal` (preset tiny-mm): the text trainer plus image and speech batches.

Each optimizer step adds, to the text micro-batch(es) of `moeforge.train.Trainer`, one batch of image
questions and one of speech transcriptions, every answer token weighted like a text token
(`media_weight`). Checkpoints hold the LM in the usual HF layout with the encoders in its `multimodal/`
subfolder. At the end the held-out split is decoded
greedily: image exact-match accuracy per question type, speech word accuracy (1 - WER), and expert load
per modality go into summary.json.
"""

from __future__ import annotations

import json

from ..checkpoint import save_checkpoint
from ..hf import hf_to_moeforge, load_into, read_safetensors
from ..model_card import training_facts
from ..train import Trainer, make_optimizer
from .data import CHANCE, ExampleSampler, image_examples, speech_examples, word_clips
from .encoders import MultimodalConfig
from .evaluate import evaluate_media
from .model import IGNORE, MultimodalLM, load_encoders, save_encoders


class MultimodalTrainer(Trainer):
    """`Trainer` whose model is a `MultimodalLM` (wrapped in the `parallelize` hook)."""

    def __init__(self, run, *args, **kwargs):
        self.mm_config = MultimodalConfig().validate()
        super().__init__(run, *args, **kwargs)
        cfg = self.cfg
        n = cfg.mm_examples
        self.console.print("  multimodal data: rendering images, synthesising speech (cached after the first run)")
        self.train_clips = word_clips("train")
        self.image_batches = ExampleSampler(image_examples("train", n, self.mm_config), cfg.mm_batch_size,
                                            cfg.seed + 2, self.mm_config, self.tokenizer)
        self.speech_batches = ExampleSampler(speech_examples("train", n, self.mm_config, self.train_clips),
                                             cfg.mm_batch_size, cfg.seed + 3, self.mm_config, self.tokenizer)

    def parallelize(self, model):
        return MultimodalLM(model, self.mm_config).to(self.device)

    def build_optimizer(self):
        """The encoders and projectors learn at `--mm-encoder-lr` x the LM's rate (docs/multimodal.md: at the
        LM's own rate the image reading failed in two of three seeds; 3x was worse still)."""
        scale = self.cfg.mm_encoder_lr
        return make_optimizer(self.model, self.cfg, {"vision.": scale, "audio.": scale})

    def optimizer_hint(self) -> str:
        return ("; a multimodal checkpoint from before --mm-encoder-lr has no optimizer groups of its own for the encoders: "
                "resume it with --mm-encoder-lr 1" if self.cfg.mm_encoder_lr != 1 else "")

    # --- checkpoints: the LM in HF layout, the encoders beside it --------------------------------------
    def save(self):
        state = {"optimizer": self.optimizer.state_dict(), **self._state()}
        return save_checkpoint(self.run_dir, self.step, self.model.lm, state, keep=self.cfg.keep_checkpoints,
                               card=training_facts(self), write_extra=lambda folder: save_encoders(self.model, folder))

    def load_weights(self, ckpt):
        load_into(self.model.lm, hf_to_moeforge(read_safetensors(ckpt), self.run.model), source=str(ckpt))
        load_encoders(self.model, ckpt)

    # --- steps ---------------------------------------------------------------------------------------
    def forward_backward(self) -> dict:
        sums = super().forward_backward()  # the text micro-batches
        ga = self.cfg.grad_accum
        for name, sampler in (("image", self.image_batches), ("speech", self.speech_batches)):
            sums[f"{name}_loss"] = 0.0
            for micro in range(ga):
                batch = sampler.batch(self.step * ga + micro).to(self.device)
                self.router_probe.seq_len = batch.input_ids.shape[1]
                with self.autocast():
                    loss = self.model.media_loss(batch)
                aux = self.router_probe.pop_loss()
                weighted = loss * self.media_weight(batch)
                total = weighted if aux is None else weighted + aux
                (total / ga).backward()
                sums[f"{name}_loss"] += loss.item() / ga
                sums["loss"] += total.item() / ga
                if aux is not None:
                    sums["aux_loss"] += aux.item() / ga
            self.router_probe.seq_len = self.cfg.seq_len
        return sums

    def media_weight(self, batch) -> float:
        """The weight of a media batch's mean answer loss beside a text micro-batch's mean token loss: its
        answer tokens / the text micro-batch's targets, times `mm_answer_weight` (1: every supervised token
        counts the same whatever its modality, as one mean over all of a mixed batch's targets would).

        Why not weight 1 per batch: 16 short answers then weighed as much as 1024 text tokens, the media
        gradients dominated the shared LM's Adam statistics (grad norm 2-5x the text-only run's), and the
        text validation loss ended 7.7% above a text-only run (docs/multimodal.md). The encoders see only
        media gradients, and Adam's update does not depend on their scale, so the weight slows only the
        LM's share of media learning."""
        answer_tokens = int((batch.targets != IGNORE).sum())
        return self.cfg.mm_answer_weight * answer_tokens / (self.cfg.batch_size * self.cfg.seq_len)

    # --- the run -------------------------------------------------------------------------------------
    def fit(self) -> dict:
        summary = super().fit()
        results = self.evaluate_media()
        summary.update(results)
        if self.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        acc = results["image_accuracy"]
        self.console.print(f"held-out image accuracy {acc['all']:.3f} (chance {results['image_chance']:.3f}), "
                           f"speech word accuracy {results['speech_word_accuracy']:.3f} (chance 0.1)")
        return summary

    def evaluate_media(self, n: int | None = None) -> dict:
        n = n or min(200, self.cfg.mm_examples)
        images = image_examples("test", n, self.mm_config)
        speech = speech_examples("test", n, self.mm_config, word_clips("test"))
        text = [self.val_batches.batch(i)[0] for i in range(self.cfg.eval_batches)]
        out = evaluate_media(self.model, images, speech, text, self.mm_config, self.tokenizer, self.autocast)
        out["image_chance"] = sum(CHANCE.values()) / len(CHANCE)
        return out
