"""The model a checkpoint was saved from, built on the meta device (no weights, no memory) to learn its
module names and types: the class config.json names in `architectures`, which is what
`AutoModel*.from_pretrained` rebuilds for it, so an adapter keyed by these names loads onto it.

transformers is imported here and only here (it costs seconds); the caller decides when.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from ..errors import CheckpointError

# Auto classes, in the order a user would reach for them, with the transformers table that says which
# class each builds for a model_type, and the peft task_type whose PeftModel subclass fits it (None:
# plain PeftModel; the classification wrappers would add modules_to_save the user did not ask for).
AUTO_CLASSES = (
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM"),
    ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "SEQ_2_SEQ_LM"),
    ("AutoModel", "MODEL_MAPPING_NAMES", None),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES", None),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", None),
    ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", None),
    ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", None),
    ("AutoModelForImageTextToText", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", None),
    ("AutoModelForPreTraining", "MODEL_FOR_PRETRAINING_MAPPING_NAMES", None),
)
_TASK_OF_AUTO = {auto: task for auto, _, task in AUTO_CLASSES}


@dataclass
class Skeleton:
    model: torch.nn.Module  # on the meta device
    class_name: str
    auto_class: str | None  # the AutoModel* class whose from_pretrained builds class_name, if any
    task_type: str | None  # peft TaskType value for adapter_config.json
    remote_code: bool
    notes: list = field(default_factory=list)

    @property
    def loader(self) -> str:
        """The class to call from_pretrained on: the Auto class when one builds this class."""
        return self.auto_class or self.class_name


def _remote_class(cfg, arch: str, root: str, trust_remote_code: bool):
    auto_map = getattr(cfg, "auto_map", None) or {}
    for auto_name, ref in auto_map.items():
        refs = ref if isinstance(ref, (list, tuple)) else [ref]
        for r in refs:
            if isinstance(r, str) and r.split(".")[-1] == arch:
                if not trust_remote_code:
                    raise CheckpointError(f"{root}: config.json names {arch}, whose code ships with the checkpoint "
                                          f"({r}); pass --trust-remote-code (trust_remote_code=True) to run it")
                from transformers.dynamic_module_utils import get_class_from_dynamic_module

                return get_class_from_dynamic_module(r, root), auto_name
    return None, None


def _auto_class_for(model_type: str | None, class_name: str) -> str | None:
    from transformers.models.auto import modeling_auto

    for auto_name, table, _ in AUTO_CLASSES:
        names = getattr(modeling_auto, table, {}).get(model_type)
        if names == class_name or (isinstance(names, (list, tuple)) and class_name in names):
            return auto_name
    return None


def build_skeleton(root: str, *, trust_remote_code: bool = False) -> Skeleton:
    """Build the class config.json names (its `architectures`; AutoModel's class when it names none) on
    the meta device. Raises CheckpointError when transformers is missing or cannot build it."""
    try:
        import transformers
    except ImportError:
        raise CheckpointError("pissa-fast init needs transformers to learn the model's module names: "
                              "pip install transformers") from None
    notes = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cfg = transformers.AutoConfig.from_pretrained(root, trust_remote_code=trust_remote_code)
        except ValueError as e:
            if "trust_remote_code" in str(e):
                raise CheckpointError(f"{root}: its config is custom code; pass --trust-remote-code "
                                      f"(trust_remote_code=True) to run it") from None
            raise CheckpointError(f"{root}/config.json: transformers cannot read it ({e})") from None
        except Exception as e:  # noqa: BLE001 - unknown model_type, corrupt file
            raise CheckpointError(f"{root}/config.json: transformers cannot read it ({type(e).__name__}: {e})"
                                  ) from None
        archs = list(getattr(cfg, "architectures", None) or [])
        remote, auto_class = False, None
        if archs:
            arch = archs[0]
            cls, auto_class = _remote_class(cfg, arch, root, trust_remote_code)
            remote = cls is not None
            if cls is None:
                cls = getattr(transformers, arch, None)
            if cls is None:
                raise CheckpointError(f"{root}: config.json names the architecture {arch}, which transformers "
                                      f"{transformers.__version__} does not have (a newer model? upgrade "
                                      f"transformers; custom code? it needs an auto_map in config.json and "
                                      f"--trust-remote-code)")
            if len(archs) > 1:
                notes.append(f"config.json names several architectures {archs}; built the first, {arch}")
        else:
            try:
                cls = transformers.AutoModel._model_mapping[type(cfg)]
            except Exception:  # noqa: BLE001
                raise CheckpointError(f"{root}: config.json names no architectures and transformers has no base "
                                      f"model for model_type {getattr(cfg, 'model_type', None)!r}") from None
            auto_class = "AutoModel"
            notes.append(f"config.json names no architectures; built AutoModel's class {cls.__name__}")
        try:
            with torch.device("meta"):
                model = cls._from_config(cfg)
        except Exception as e:  # noqa: BLE001 - whatever the model's __init__ raises
            raise CheckpointError(f"{root}: transformers could not build {cls.__name__} from config.json "
                                  f"({type(e).__name__}: {e})") from None
    if auto_class is None:
        auto_class = _auto_class_for(getattr(cfg, "model_type", None), cls.__name__)
    return Skeleton(model.eval(), cls.__name__, auto_class, _TASK_OF_AUTO.get(auto_class), remote, notes)
