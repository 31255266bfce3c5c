"""Quantization-aware fine-tuning: nudge a copy of the student's float weights so that INT8 keeps its answers.

Post-training INT8 rounds each weight to the nearest step, whatever that does to the output; on a student with a
few low-variance, high-gain channels (fine-tuned EfficientNet-Lite on textiles) that flips 3-4% of the top-1s. Here
a copy of the student is trained for a few hundred steps under simulated INT8, the same scheme the exporters apply
(per-channel symmetric int8 weights, per-tensor uint8 activations over their calibration min/max, quantized at the
input of every Conv/Linear and at the output of every conv's BatchNorm+activation), to reproduce the float student's
scores (self-distillation: KL on the softmax plus MSE on the scores). The straight-through estimator carries the
gradient through the rounding. The tuned copy is exported in float and quantized by the backend's own PTQ tool as
usual, so the INT8 graph, and its speed, are unchanged; only the weights it rounds are better placed.

It trains on the training pool (the recipe's own training images), picks its step on the selection split, never
looks at the test split, and the parity gate still compares against the original student. BatchNorm statistics
stay frozen (eval mode) and ranges are recalibrated as the weights move, since the backend's calibration will see
the tuned weights.
"""
import copy
import logging

import numpy as np

from .parity import pytorch_scores

log = logging.getLogger(__name__)


class _Ranges:
    """Per-tensor min/max of every quantized activation, measured on float forwards over calibration images."""

    def __init__(self):
        self.values = {}
        self.observing = False

    def update(self, key, t):
        lo, hi = self.values.get(key, (0.0, 0.0))   # the range always holds 0, as in ONNX Runtime and NNCF
        self.values[key] = (min(lo, float(t.min())), max(hi, float(t.max())))

    def fake_quant(self, key, t):
        if self.observing:
            self.update(key, t)
            return t
        return fake_quant_uint8(t, *self.values[key])


def fake_quant_uint8(t, lo: float, hi: float):
    """``t`` through per-tensor asymmetric uint8 over [lo, hi] (straight-through): an activation as both backends
    quantize it."""
    import torch

    scale = max(hi - lo, 1e-8) / 255
    return torch.fake_quantize_per_tensor_affine(t, scale, round(-lo / scale), 0, 255)


def fake_quant_weight(w):
    """``w`` through per-output-channel symmetric int8, scale = max|w| / 127 (straight-through)."""
    import torch

    amax = w.detach().abs().flatten(1).amax(1).clamp(min=1e-12)
    return torch.fake_quantize_per_channel_affine(w, amax / 127, torch.zeros_like(amax, dtype=torch.int32), 0, -128,
                                                  127)


def _weight_int8():
    """A weight parametrization through ``fake_quant_weight``. ``enabled = False`` passes the float weight
    (calibration sees the float model, as the backend's will)."""
    import torch

    class WeightInt8(torch.nn.Module):
        enabled = True

        def forward(self, w):
            return fake_quant_weight(w) if self.enabled else w
    return WeightInt8()


def simulate_int8(model, float_modules=()):
    """Hook simulated INT8 into ``model`` in place; returns (ranges, undo). Modules named in ``float_modules`` stay
    float (mixed precision, as the exporter will leave them)."""
    import torch
    from torch.nn.utils import parametrize

    ranges, handles = _Ranges(), []
    quantized = {name: m for name, m in model.named_modules()
                 if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and name not in float_modules}
    for name, m in quantized.items():
        handles.append(m.register_forward_pre_hook(
            lambda _, args, key=f"{name}:in": (ranges.fake_quant(key, args[0]), *args[1:])))
        parametrize.register_parametrization(m, "weight", _weight_int8())
    # A conv's output is quantized after its BatchNorm folds into it: after a ReLU/ReLU6 too (ONNX Runtime fuses
    # Conv+Relu/Clip, NNCF quantizes the activation's output), before any other activation (SiLU, GELU: not fused).
    # That is the BatchNorm module right after a quantized conv (timm's BatchNormAct), else the conv itself. Linear
    # outputs stay float (the class scores are never quantized: ``onnx.float_outputs``).
    fused = (torch.nn.Identity, torch.nn.ReLU, torch.nn.ReLU6)
    previous, with_bn = None, set()
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and previous in quantized:
            act = getattr(m, "act", None)
            if act is None or isinstance(act, fused):
                handles.append(m.register_forward_hook(
                    lambda _, __, out, key=f"{name}:out": ranges.fake_quant(key, out)))
            else:
                handles.append(act.register_forward_pre_hook(
                    lambda _, args, key=f"{name}:out": (ranges.fake_quant(key, args[0]),)))
            with_bn.add(previous)
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.modules.batchnorm._BatchNorm)):
            previous = name
    for name, m in quantized.items():
        if isinstance(m, torch.nn.Conv2d) and name not in with_bn:
            handles.append(m.register_forward_hook(lambda _, __, out, key=f"{name}:out": ranges.fake_quant(key, out)))

    def set_weights(enabled: bool):
        for m in quantized.values():
            m.parametrizations.weight[0].enabled = enabled

    def undo():
        for h in handles:
            h.remove()
        for m in quantized.values():
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
    ranges.set_weights = set_weights
    return ranges, undo


def calibrate(model, ranges: _Ranges, x: np.ndarray, batch: int = 32):
    """Measure every quantized tensor's float min/max over ``x``, as the backend's MinMax calibration will."""
    import torch

    ranges.values, ranges.observing = {}, True
    ranges.set_weights(False)
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch):
                model(torch.from_numpy(x[i:i + batch]))
    finally:
        ranges.observing = False
        ranges.set_weights(True)


def held_out_quality(tuned, val: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, -KL) of simulated INT8 against the float scores: higher is better, agreement first."""
    out = pytorch_scores(tuned, val)
    p = np.exp(reference - reference.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    log_q = out - out.max(1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(1, keepdims=True))
    kl = float((p * (np.log(p + 1e-12) - log_q)).sum(1).mean())
    return float((out.argmax(1) == reference.argmax(1)).mean()), -kl


def self_distillation_step(model, tuned, train: np.ndarray, rng, batch: int, t: float, optimizer) -> float:
    """One step: ``tuned`` (simulated INT8) learns ``model``'s float scores on a random batch, flipped at random."""
    import torch
    import torch.nn.functional as F

    idx = rng.choice(len(train), size=min(batch, len(train)), replace=False)
    x = torch.from_numpy(train[idx])
    flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    with torch.no_grad():
        target = model(x)
    out = tuned(x)
    loss = (F.kl_div(F.log_softmax(out / t, 1), F.log_softmax(target / t, 1), log_target=True, reduction="batchmean")
            * t * t + F.mse_loss(out, target))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def finetune(model, calib: np.ndarray, train: np.ndarray, val: np.ndarray, float_modules=(), steps: int = 200,
             batch: int = 16, lr: float = 1e-5, recalibrate_every: int = 50, temperature: float = 2.0,
             seed: int = 0):
    """A copy of ``model`` fine-tuned under simulated INT8 to reproduce ``model``'s scores; (copy, info).

    ``calib``: the backend's calibration inputs (ranges); ``train``: training-pool inputs to train on (flipped at
    random); ``val``: selection-split inputs (held out from ``train`` and ``calib``), where simulated INT8 top-1
    agreement picks the step and is reported before and after (never the test split).
    """
    import torch

    from ..utils import progress

    if not len(train):
        train = calib
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model.eval()
    tuned = copy.deepcopy(model).eval()   # eval: BatchNorm statistics and dropout stay as exported
    ranges, undo = simulate_int8(tuned, float_modules)
    try:
        reference_scores = pytorch_scores(model, val)
        calibrate(tuned, ranges, calib)
        before = held_out_quality(tuned, val, reference_scores)
        params = [p for p in tuned.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
        losses, history = [], [(0, *before)]
        best = (before, 0, {k: v.clone() for k, v in tuned.state_dict().items()})
        with torch.inference_mode(False), progress(range(steps), desc="INT8-aware fine-tuning",
                                                   unit="step") as bar:
            for step in bar:
                if step and step % recalibrate_every == 0:
                    calibrate(tuned, ranges, calib)
                    quality = held_out_quality(tuned, val, reference_scores)
                    history.append((step, *quality))
                    if quality > best[0]:
                        best = (quality, step, {k: v.clone() for k, v in tuned.state_dict().items()})
                loss = self_distillation_step(model, tuned, train, rng, batch, temperature, optimizer)
                schedule.step()
                losses.append(loss)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", refresh=False)
        calibrate(tuned, ranges, calib)
        final = held_out_quality(tuned, val, reference_scores)
        history.append((steps, *final))
        chosen, after = steps, final
        if best[0] > final:   # keep the weights that did best on the held-out images
            tuned.load_state_dict(best[2])
            chosen, after = best[1], best[0]
    finally:
        undo()
    info = {"method": "INT8-aware fine-tuning (self-distillation under simulated INT8, straight-through)",
            "steps": steps, "chosen_step": chosen, "batch": batch,
            "lr": lr, "schedule": "cosine", "loss": f"KL(T={temperature}) + MSE on the float student's scores",
            "train_images": len(train), "float_modules": list(float_modules), "validation_images": len(val),
            "simulated_agreement_before": before[0], "simulated_agreement_after": after[0],
            "history": [{"step": st, "agreement": a, "kl": -nkl} for st, a, nkl in history]}
    log.info("INT8-aware fine-tuning: simulated INT8 agreement on %d selection images %.3f -> %.3f",
             len(val), before[0], after[0])
    return tuned.eval(), info
