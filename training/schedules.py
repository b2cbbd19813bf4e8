"""Self-distillation schedules, owned by the training loop (as DINOv2's `build_schedulers`) and passed to the model:
the EMA teacher's momentum and the teacher temperature, both functions of the optimizer step."""

import math

from modeling_unimedi import UniMedIConfig


def ema_momentum(config: UniMedIConfig, step: int, total_steps: int) -> float:
    """DINO's cosine schedule from `config.ema_momentum` at step 0 to 1 at `total_steps` (and after)."""
    progress = min(step, total_steps) / max(total_steps, 1)
    return 1 - (1 - config.ema_momentum) * (math.cos(math.pi * progress) + 1) / 2


def teacher_temperature(config: UniMedIConfig, step: int) -> float:
    """DINO's linear warm-up from `teacher_temperature_warmup` to `teacher_temperature` over
    `teacher_temperature_warmup_steps`, then constant."""
    warmup = config.teacher_temperature_warmup_steps
    if warmup <= 0 or step >= warmup:
        return config.teacher_temperature
    start = config.teacher_temperature_warmup
    return start + step / warmup * (config.teacher_temperature - start)
