"""Typed dependencies shared by the routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.classifier import Classifier, NotReady
from app.config import Settings


async def get_classifier(request: Request) -> Classifier:
    classifier: Classifier | None = getattr(request.app.state, "classifier", None)
    if classifier is None:
        raise NotReady("the model is loading")
    return classifier


async def app_settings(request: Request) -> Settings:
    """The settings the app was created with (not necessarily the environment's: tests)."""
    settings: Settings = request.app.state.settings
    return settings


ClassifierDep = Annotated[Classifier, Depends(get_classifier)]
SettingsDep = Annotated[Settings, Depends(app_settings)]
