"""Request models of ``POST /v1/fine_tuning/jobs``, as the OpenAI API and its SDK define them.

Types and ranges are checked here (a bad one is a 400 naming the field, e.g.
``hyperparameters.n_epochs``); rules across fields are checked by ``jobs.FineTuning.create``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

Auto = Literal["auto"]
Epochs = Annotated[StrictInt, Field(ge=1, le=50)] | Auto | None
BatchSize = Annotated[StrictInt, Field(ge=1, le=256)] | Auto | None
Multiplier = Annotated[float, Field(gt=0, le=10, strict=True)] | Auto | None
Beta = Annotated[float, Field(gt=0, le=2, strict=True)] | Auto | None


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Hyperparameters(_Request):
    batch_size: BatchSize = None
    learning_rate_multiplier: Multiplier = None
    n_epochs: Epochs = None


class DpoHyperparameters(Hyperparameters):
    beta: Beta = None


class SupervisedMethod(_Request):
    hyperparameters: Hyperparameters | None = None


class DpoMethod(_Request):
    hyperparameters: DpoHyperparameters | None = None


class Method(_Request):
    type: Literal["supervised", "dpo"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None


class FineTuningJobRequest(_Request):
    model: str = Field(min_length=1, max_length=300)
    training_file: str = Field(min_length=1, max_length=100)
    validation_file: Annotated[str, Field(min_length=1, max_length=100)] | None = None
    hyperparameters: Hyperparameters | None = None  # deprecated by OpenAI in favour of method
    method: Method | None = None
    suffix: Annotated[str, Field(max_length=64)] | None = None
    seed: Annotated[StrictInt, Field(ge=0, le=2**31 - 1)] | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = None
    integrations: list[Any] | None = None
