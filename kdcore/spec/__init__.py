"""Job specs: one pydantic model tree, loaded from YAML, refusing unknown keys.

Public entry points: :class:`JobSpec` (``JobSpec.from_yaml(path)``) and the part models.
"""

from kdcore.spec.base import Spec
from kdcore.spec.data import AugmentSpec, DataSpec, FactoryData, ImageFolderData, NpzData, ParquetData, SklearnDigits
from kdcore.spec.features import CacheSpec, FeaturesSpec, StreamSpec
from kdcore.spec.checks import cross_field_problems
from kdcore.spec.job import JobSpec, OutputSpec, RaySpec
from kdcore.spec.loading import load_yaml, validate_model
from kdcore.spec.losses import (
    ATLossSpec, CELossSpec, CosineLossSpec, CRDLossSpec, CRDParams, DISTLossSpec, DKDLossSpec, HintLossSpec,
    InfoNCELossSpec, KDLossSpec, LossSpec, MGDLossSpec, NKDLossSpec, PKTLossSpec, ReviewKDLossSpec, RKDLossSpec,
    SPLossSpec, SRDLossSpec, loss_union,
)
from kdcore.spec.models import FactoryModel, ModelSource, TimmModel, TorchvisionModel
from kdcore.spec.projector import PairSpec, ProjectorSpec
from kdcore.spec.roles import AutoscalingSpec, HTTPSpec, ServeSpec, StudentSpec, TeacherSpec
from kdcore.spec.train import CheckpointSpec, OptimizerSpec, ScheduleSpec, TrainSpec

__all__ = [
    "Spec", "JobSpec", "TeacherSpec", "StudentSpec", "ServeSpec", "HTTPSpec", "AutoscalingSpec", "PairSpec",
    "ProjectorSpec", "LossSpec", "loss_union", "CELossSpec", "KDLossSpec", "DKDLossSpec", "DISTLossSpec",
    "NKDLossSpec", "HintLossSpec", "CosineLossSpec", "PKTLossSpec", "SPLossSpec", "RKDLossSpec", "ATLossSpec",
    "InfoNCELossSpec", "CRDLossSpec", "CRDParams", "MGDLossSpec", "SRDLossSpec", "ReviewKDLossSpec", "DataSpec", "AugmentSpec", "SklearnDigits", "NpzData",
    "ParquetData", "ImageFolderData", "FactoryData", "FeaturesSpec", "StreamSpec", "CacheSpec", "TrainSpec",
    "OptimizerSpec", "ScheduleSpec", "CheckpointSpec", "RaySpec", "OutputSpec", "FactoryModel", "TorchvisionModel",
    "TimmModel", "ModelSource", "cross_field_problems", "load_yaml", "validate_model",
]
