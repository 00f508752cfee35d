"""Train the embedded demo model (seeded, reproducible) and save it as a diffusers pipeline folder.

    python -m attncap.demo_model.train --out attncap/assets/shapes_model --steps 2400
    python -m attncap.demo_model.train --out /tmp/shapes --minutes 25     # fit the step count to 25 min

Everything random comes from --seed: the initial weights, the training scenes (drawn from seeds
below scenes.HELDOUT_SEED, a fresh batch every step, so nothing repeats), caption dropout, noise and
timesteps. The learning-rate schedule depends only on --steps, so the same --steps and --seed on
the same device type and thread count give the same weights. --minutes without --steps times a few
steps first and picks --steps to fit (it prints the number: pass it as --steps to reproduce).
The saved pipeline holds the EMA weights; training_info.json next to it records the run.

Design for grounding (see text_encoder.py): padding encodes to zero keys and values, so the
UNet can only read the prompt from its word keys; cross-attention sits at 16x16 and 8x8 (and the
8x8 mid block), 4 heads; 10% of captions are dropped (all padding) for classifier-free guidance.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import scenes
from .pipeline import ShapesPipeline
from .text_encoder import ShapesTextEncoder
from .tokenizer import MAX_LENGTH, VOCAB, build_tokenizer, encode

TRAIN_TIMESTEPS = 1000


def build_pipeline(seed: int = 0) -> ShapesPipeline:
    """A freshly initialised ShapesPipeline (the architecture of the shipped model)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=scenes.SIZE, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=4,  # diffusers reads this as 4 heads (of 16 channels)
        norm_num_groups=8)
    text_encoder = ShapesTextEncoder(vocab_size=len(VOCAB), max_length=MAX_LENGTH, hidden_size=64, num_layers=2,
                                     num_heads=4, pad_token_id=0)
    scheduler = DDIMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule="linear", beta_start=1e-4,
                              beta_end=0.02, clip_sample=True, set_alpha_to_one=False, timestep_spacing="trailing",
                              prediction_type="epsilon")
    return ShapesPipeline(unet=unet, text_encoder=text_encoder, tokenizer=build_tokenizer(), scheduler=scheduler)


def training_seeds(seed: int, step: int, batch: int) -> list[int]:
    """The scene seeds of one training batch: distinct across steps, all below HELDOUT_SEED."""
    base = (seed * 7_919_993 + step * batch) % (scenes.HELDOUT_SEED - batch)
    return list(range(base, base + batch))


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class _RecordingProcessor:
    """Cross-attention with the probabilities kept for the grounding loss (the math of AttnProcessor2_0
    for a transformer block's attn2: no group norm, no residual, no mask)."""

    def __init__(self, sink: list):
        self.sink = sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        b, n, c = hidden_states.shape
        h = attn.heads
        q = attn.to_q(hidden_states).view(b, n, h, -1).transpose(1, 2)
        k = attn.to_k(encoder_hidden_states).view(b, encoder_hidden_states.shape[1], h, -1).transpose(1, 2)
        v = attn.to_v(encoder_hidden_states).view(b, encoder_hidden_states.shape[1], h, -1).transpose(1, 2)
        p = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)   # [B, H, N, L]
        self.sink.append(p)
        out = (p @ v).transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def word_masks(batch: list, dropped: list[bool], length: int = MAX_LENGTH) -> torch.Tensor:
    """float32 [B, L, H, W]: for each caption position of a colour or shape word, the mask of the
    object it names (captions read "a <colour> <shape> and a <colour> <shape> ..."); zero elsewhere."""
    size = batch[0].image.shape[0]
    out = np.zeros((len(batch), length, size, size), np.float32)
    for i, (sc, d) in enumerate(zip(batch, dropped)):
        if d:
            continue
        for k, obj in enumerate(sc.objects):
            for pos in (4 * k + 1, 4 * k + 2):   # the colour word, the shape word
                if pos < length:
                    out[i, pos] = obj.mask
    return torch.from_numpy(out)


def grounding_loss(probs: list[torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
    """Mean over layers and supervised words of KL(mask || map): the word's head-averaged attention
    map, normalised over the image, against its object's mask normalised the same way. Zero when
    the word's attention spreads evenly over its object and nowhere else (cf. TokenCompose's token loss,
    which only penalises attention outside the object and so lets maps shrink to the object's centre)."""
    valid = masks.flatten(2).amax(-1) > 0                          # [B, L]
    if not valid.any():
        return masks.new_zeros(())
    total = 0.0
    for p in probs:
        a = p.mean(1).transpose(1, 2)[valid]                        # [words, N]
        g = math.isqrt(a.shape[-1])
        m = F.adaptive_avg_pool2d(masks, (g, g)).flatten(2)[valid]  # [words, N]
        m = m / m.sum(-1, keepdim=True)
        a = a / a.sum(-1, keepdim=True)
        total = total + (m * (torch.log(m + 1e-8) - torch.log(a + 1e-8))).sum(-1).mean()
    return total / len(probs)

class Trainer:
    def __init__(self, seed: int = 0, batch: int = 32, lr: float = 2e-3, device: str = "cpu",
                 caption_dropout: float = 0.1, ema_decay: float = 0.995, objects=(1, 3), attn_loss: float = 0.0,
                 min_snr: float = 0.0):
        self.seed, self.batch, self.lr, self.device = seed, batch, lr, torch.device(device)
        self.caption_dropout, self.ema_decay, self.objects = caption_dropout, ema_decay, objects
        self.attn_loss, self.min_snr = attn_loss, min_snr
        self.pipe = build_pipeline(seed)
        self.unet = self.pipe.unet.to(self.device).train()
        self.probs: list[torch.Tensor] = []
        if attn_loss:
            self.unet.set_attn_processor({name: (_RecordingProcessor(self.probs) if name.endswith("attn2.processor")
                                                 else proc) for name, proc in self.unet.attn_processors.items()})
        self.text_encoder = self.pipe.text_encoder.to(self.device).train()
        self.params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        self.ema = [p.detach().clone() for p in self.params]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
        alphas = self.pipe.scheduler.alphas_cumprod.to(self.device)
        self.sqrt_a, self.sqrt_1ma = alphas.sqrt(), (1 - alphas).sqrt()
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.step = 0

    def train_step(self, steps_total: int, warmup: int) -> float:
        batch = [scenes.make_scene(s, objects=self.objects) for s in training_seeds(self.seed, self.step, self.batch)]
        images = np.stack([sc.image.transpose(2, 0, 1) for sc in batch]) * 2.0 - 1.0
        drop = torch.rand(self.batch, generator=self.gen) < self.caption_dropout
        captions = ["" if d else sc.caption for sc, d in zip(batch, drop.tolist())]
        enc = encode(self.pipe.tokenizer, captions)
        x0 = torch.from_numpy(images.astype(np.float32)).to(self.device)
        t = torch.randint(0, TRAIN_TIMESTEPS, (self.batch,), generator=self.gen).to(self.device)
        noise = torch.randn(x0.shape, generator=self.gen).to(self.device)
        xt = self.sqrt_a[t, None, None, None] * x0 + self.sqrt_1ma[t, None, None, None] * noise
        embeds = self.text_encoder(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))
        self.probs.clear()
        pred = self.unet(xt, t, encoder_hidden_states=embeds).sample
        if self.min_snr:  # Min-SNR-gamma weighting (Hang et al. 2023) for epsilon prediction
            snr = (self.sqrt_a[t] / self.sqrt_1ma[t]) ** 2
            w = snr.clamp(max=self.min_snr) / snr
            mse = ((pred - noise) ** 2).mean((1, 2, 3))
            loss, mse = (w * mse).mean(), mse.mean()
        else:
            loss = mse = F.mse_loss(pred, noise)
        if self.attn_loss:
            grounding = grounding_loss(self.probs, word_masks(batch, drop.tolist()).to(self.device))
            loss = loss + self.attn_loss * grounding
            self.last_grounding = grounding.item()
            self.probs.clear()
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, steps_total, self.lr, warmup)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        decay = min(self.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for e, p in zip(self.ema, self.params):
                e.lerp_(p.detach(), 1 - decay)
        self.step += 1
        return mse.item()

    def ema_pipeline(self) -> ShapesPipeline:
        pipe = copy.deepcopy(self.pipe)
        params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
        with torch.no_grad():
            for p, e in zip(params, self.ema):
                p.copy_(e)
        pipe.unet.eval()
        pipe.text_encoder.eval()
        return pipe.to("cpu")


def save(pipe: ShapesPipeline, out: Path, info: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    # Name the tokenizer class portably (transformers 5 saves its backend class name).
    index = json.loads((out / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    tok_cfg = out / "tokenizer" / "tokenizer_config.json"
    if tok_cfg.exists():
        cfg = json.loads(tok_cfg.read_text())
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        tok_cfg.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: fit --minutes, else 2400)")
    ap.add_argument("--minutes", type=float, default=None, help="fit --steps to this many minutes (timed first)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-snr", type=float, default=0.0, help="Min-SNR-gamma loss weighting (0: plain MSE)")
    ap.add_argument("--attn-loss", type=float, default=0.0,
                    help="weight of an auxiliary grounding loss on the cross-attention maps (0: none)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: results depend on it, and on a shared CPU extra threads "
                         "spin more than they compute)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--save-every", type=int, default=0, help="also save EMA snapshots as <out>-step<N> every N steps")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)

    trainer = Trainer(seed=args.seed, batch=args.batch, lr=args.lr, device=args.device, attn_loss=args.attn_loss,
                      min_snr=args.min_snr)
    steps = args.steps
    if steps is None and args.minutes is not None:
        probe = Trainer(seed=args.seed, batch=args.batch, lr=args.lr, device=args.device, attn_loss=args.attn_loss)
        probe.train_step(100, 10)
        t0 = time.perf_counter()
        for _ in range(4):
            probe.train_step(100, 10)
        per_step = (time.perf_counter() - t0) / 4
        steps = max(args.warmup + 1, int(args.minutes * 60 * 0.95 / per_step))
        print(f"{per_step:.3f} s/step: --minutes {args.minutes} -> --steps {steps}", flush=True)
        del probe
    steps = steps or 2400
    n_params = sum(p.numel() for p in trainer.params)
    print(f"training {n_params / 1e6:.2f} M parameters for {steps} steps of {args.batch} on {args.device} "
          f"({torch.get_num_threads()} threads)", flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    losses: list[float] = []
    for step in range(steps):
        losses.append(trainer.train_step(steps, args.warmup))
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            el = time.perf_counter() - t0
            print(f"step {step + 1}/{steps}  loss {np.mean(losses[-args.log_every:]):.4f}  "
                  + (f"grounding {float(trainer.last_grounding):.3f}  " if args.attn_loss else "")
                  + f"lr {trainer.opt.param_groups[0]['lr']:.2e}  {el / 60:.1f} min (cpu {(time.process_time() - c0) / 60:.1f})  "
                  f"(eta {el / (step + 1) * (steps - step - 1) / 60:.1f} min)", flush=True)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < steps:
            snap = args.out.with_name(f"{args.out.name}-step{step + 1}")
            save(trainer.ema_pipeline(), snap, {"steps_done": step + 1, "of_steps": steps, "seed": args.seed})
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    import diffusers
    import transformers

    info = {"steps": steps, "batch": args.batch, "lr": args.lr, "warmup": args.warmup, "seed": args.seed,
            "caption_dropout": trainer.caption_dropout, "attn_loss": trainer.attn_loss, "min_snr": trainer.min_snr, "ema_decay": trainer.ema_decay,
            "objects_per_scene": list(trainer.objects), "parameters": n_params,
            "final_loss": float(np.mean(losses[-100:])), "train_seconds": round(seconds, 1),
            "train_cpu_seconds": round(cpu_seconds, 1),
            "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "loss_curve": [round(float(np.mean(losses[i:i + 100])), 4) for i in range(0, len(losses), 100)]}
    save(trainer.ema_pipeline(), args.out, info)
    print(f"saved {args.out} (final loss {info['final_loss']:.4f}, {seconds / 60:.1f} min)", flush=True)


if __name__ == "__main__":
    main()
