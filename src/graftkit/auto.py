"""``AutoPeftModel*``: load the base model named in an adapter's config, then the adapter onto it.

The base model comes from ``base_model_name_or_path`` (a local folder, or a Hub id present in the local
HF cache) through the matching transformers ``AutoModelFor...`` class.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from .config import PeftConfig, TaskType
from .errors import ConfigError
from .model import TASK_CLASSES, PeftModel


class AutoPeftModel:
    """Base of the auto classes; ``AutoPeftModel`` itself picks the base class from the adapter's config."""

    auto_class_name: ClassVar[str | None] = None  # a transformers AutoModelFor... name
    task_type: ClassVar[TaskType | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} is built with {type(self).__name__}.from_pretrained(path)")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        revision: str | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Load base model + adapter. ``kwargs`` go to the transformers ``from_pretrained`` (``torch_dtype`` ...).

        Raises:
            ConfigError: the adapter config names no base model, or a base class transformers does not have.
        """
        import transformers

        peft_config = config or PeftConfig.from_pretrained(pretrained_model_name_or_path, revision=revision)
        base_path = peft_config.base_model_name_or_path
        if not base_path:
            raise ConfigError(
                f"{pretrained_model_name_or_path}: adapter_config.json has no base_model_name_or_path; load the "
                "base model yourself and call PeftModel.from_pretrained(base, path)"
            )
        class_name = cls.auto_class_name
        if class_name is None:
            mapping = peft_config.auto_mapping or {}
            task = peft_config.task_type
            class_name = _AUTO_BY_TASK.get(TaskType(task)) if task else mapping.get("base_model_class")
            if class_name is None:
                class_name = "AutoModel"
        base_cls = getattr(transformers, class_name, None)
        if base_cls is None:
            raise ConfigError(f"transformers has no class {class_name!r} to load '{base_path}'")
        base = base_cls.from_pretrained(base_path, revision=peft_config.revision, **kwargs)
        peft_cls = TASK_CLASSES.get(cls.task_type or TaskType(peft_config.task_type), PeftModel) if (
            cls.task_type or peft_config.task_type) else PeftModel
        return peft_cls.from_pretrained(
            base, pretrained_model_name_or_path, adapter_name=adapter_name, is_trainable=is_trainable,
            config=peft_config, revision=revision,
        )


_AUTO_BY_TASK = {
    TaskType.CAUSAL_LM: "AutoModelForCausalLM",
    TaskType.SEQ_2_SEQ_LM: "AutoModelForSeq2SeqLM",
    TaskType.SEQ_CLS: "AutoModelForSequenceClassification",
    TaskType.TOKEN_CLS: "AutoModelForTokenClassification",
    TaskType.QUESTION_ANS: "AutoModelForQuestionAnswering",
    TaskType.FEATURE_EXTRACTION: "AutoModel",
}


def _auto(task: TaskType) -> type[AutoPeftModel]:
    name = "AutoPeftModelFor" + {
        TaskType.CAUSAL_LM: "CausalLM", TaskType.SEQ_2_SEQ_LM: "Seq2SeqLM", TaskType.SEQ_CLS: "SequenceClassification",
        TaskType.TOKEN_CLS: "TokenClassification", TaskType.QUESTION_ANS: "QuestionAnswering",
        TaskType.FEATURE_EXTRACTION: "FeatureExtraction",
    }[task]
    return type(name, (AutoPeftModel,), {"auto_class_name": _AUTO_BY_TASK[task], "task_type": task,
                                         "__doc__": f"Loads a {_AUTO_BY_TASK[task]} base and its adapter."})


AutoPeftModelForCausalLM = _auto(TaskType.CAUSAL_LM)
AutoPeftModelForSeq2SeqLM = _auto(TaskType.SEQ_2_SEQ_LM)
AutoPeftModelForSequenceClassification = _auto(TaskType.SEQ_CLS)
AutoPeftModelForTokenClassification = _auto(TaskType.TOKEN_CLS)
AutoPeftModelForQuestionAnswering = _auto(TaskType.QUESTION_ANS)
AutoPeftModelForFeatureExtraction = _auto(TaskType.FEATURE_EXTRACTION)
