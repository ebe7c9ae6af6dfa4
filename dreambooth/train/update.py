"""How gradients become new weights: one object the loop calls ``backward(loss)`` and ``step()`` on.

Two paths, chosen by the config; the optimizer's entry in ``optimizers.py`` builds it on either:
- torch's optimizers on fp32 weights (AdamW as one fused kernel where torch has it, AdamW 8-bit, Adafactor), with
  an fp16 GradScaler when autocast runs in fp16;
- the UNet's weights in one flat buffer (``speed/flat.py``) updated by our own kernel (``speed/adamw.py``, its
  8-bit-moment twin ``speed/adamw8bit.py``, ``speed/adafactor.py``) that writes bf16 weights with stochastic
  rounding; optionally inside the backward pass (``speed/backward.py``), so the full gradient never exists. The
  text encoder, when it trains, stays on torch's optimizer (the same optimizer).

One LR schedule drives both: it is built on the torch optimizer, whose first group stands for the UNet (on the
flat path that group holds only a placeholder, and without a trained text encoder the torch optimizer is a plain
AdamW that never updates anything), and its value is handed to the flat optimizer after each step.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch

from ..config import TrainConfig
from .optim import build_lr_scheduler, build_optimizer, load_keeping_kernel, trainable
from .optimizers import adam_arguments, optimizer_spec, torch_adamw
from .parallel import Parallel
from .speed.backward import BackwardStep
from .speed.flat import FlatParameters


class Updater:
    """Applies one optimizer step's gradients to the trained weights (see the module docstring)."""

    def __init__(
        self,
        config: TrainConfig,
        unet: torch.nn.Module,
        text_encoders: Sequence[tuple[torch.nn.Module, float]],
        total_steps: int,
        flat: bool,
        in_backward: bool,
        grad_scaler,
        compile_optimizer: bool,
        parallel: Parallel | None = None,
    ) -> None:
        self.config = config
        self.scaler = grad_scaler
        self.parallel = parallel or Parallel()
        self.spec = optimizer_spec(config.optimizer)
        self.flat_optimizer = None
        self.backward_step: BackwardStep | None = None
        unet_params = trainable(unet.parameters())
        if flat:
            self.flat = FlatParameters(
                unet_params, dtype=next(unet.parameters()).dtype, with_grad_buffer=not in_backward
            )
            compile = compile_optimizer and self.flat.data.is_cuda and importlib.util.find_spec("triton") is not None
            self.flat_optimizer = self.spec.build_flat(self.flat, config, compile)
            if in_backward:
                self.backward_step = BackwardStep(self.flat, self.flat_optimizer)
            placeholder = torch.zeros(1, device=self.flat.data.device, requires_grad=True)
            groups = [{"params": [placeholder], "lr": config.learning_rate}]
        else:
            groups = [{"params": unet_params, "lr": config.learning_rate}]
        for text_encoder, lr in text_encoders:  # one group each, at its own learning rate
            groups.append({"params": trainable(text_encoder.parameters()), "lr": lr})
        if flat and len(groups) == 1:  # the schedule's carrier: a placeholder, nothing to update
            self.torch_optimizer = torch_adamw(groups, adam_arguments(config))
        else:
            self.torch_optimizer = build_optimizer(config, groups)
        self.lr_scheduler = build_lr_scheduler(config, self.torch_optimizer, total_steps)
        self._clipped = [p for g in groups[0 if not flat else 1 :] for p in g["params"]]
        self._hand_lr_to_flat()

    @property
    def kind(self) -> str:
        """A name for the log: which optimizer updates the UNet, and how."""
        if self.flat_optimizer is None:
            return type(self.torch_optimizer).__name__
        return type(self.flat_optimizer).__name__ + (" in backward" if self.backward_step else "")

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of ``loss`` (scaled for fp16)."""
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, unet_updated: bool = False) -> None:
        """Apply the accumulated gradients, advance the LR schedule and clear the gradients. ``unet_updated``: the
        UNet's fused update already ran (inside a recorded step graph)."""
        if self.parallel.active:  # every process's copy takes the update of the average gradient
            self.parallel.average_(self._gradients())
        if self.backward_step is not None:
            if not unet_updated:
                self.backward_step.finish()
        elif self.flat_optimizer is not None:
            self.flat_optimizer.step()
        if self.scaler:
            self.scaler.unscale_(self.torch_optimizer)
        if self.config.max_grad_norm:
            with_grad = [p for p in self._clipped if p.grad is not None]
            if with_grad:
                torch.nn.utils.clip_grad_norm_(with_grad, self.config.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.torch_optimizer)
            self.scaler.update()
        else:
            self.torch_optimizer.step()
        self.lr_scheduler.step()
        self.torch_optimizer.zero_grad(set_to_none=True)
        self._hand_lr_to_flat()

    def _gradients(self) -> list[torch.Tensor]:
        """Every gradient the next update reads: the flat buffer (UNet) and the torch optimizer's parameters'."""
        grads = [self.flat.grad] if self.flat_optimizer is not None and self.flat.grad is not None else []
        return grads + [p.grad for g in self.torch_optimizer.param_groups for p in g["params"] if p.grad is not None]

    @property
    def lr(self) -> float:
        """The UNet's learning rate for the next step."""
        return self.lr_scheduler.get_last_lr()[0]

    def state_dict(self) -> dict:
        """Everything a resume needs: optimizers and the schedule."""
        state = {"torch": self.torch_optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict()}
        if self.flat_optimizer is not None:
            state["flat"] = self.flat_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        load_keeping_kernel(self.torch_optimizer, state["torch"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.flat_optimizer is not None:
            self.flat_optimizer.load_state_dict(state["flat"])
        self._hand_lr_to_flat()

    def _hand_lr_to_flat(self) -> None:
        if self.flat_optimizer is not None:
            self.flat_optimizer.set_lr(self.lr)
