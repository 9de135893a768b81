"""Recovery after pruning: distil the dense model into the pruned one (``rcpu recover``)."""

from .config import PARAMETERS, RecoverConfig, RecoverRecord
from .loss import distillation_loss, loss_terms, reference_distillation_loss
from .run import (
    RecoverInputs,
    check_texts,
    check_work_dir,
    default_teacher_dtype,
    recover_checkpoint,
    recover_model,
    summary_lines,
    teacher_for,
    work_dir_for,
)

__all__ = ["PARAMETERS", "RecoverConfig", "RecoverInputs", "RecoverRecord", "check_texts", "check_work_dir",
           "default_teacher_dtype", "distillation_loss", "loss_terms",
           "recover_checkpoint", "recover_model", "reference_distillation_loss", "summary_lines", "teacher_for",
           "work_dir_for"]
