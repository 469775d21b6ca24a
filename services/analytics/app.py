"""The analytics service's app. Its public endpoints arrive with their issue; today it serves the
operations endpoints every service has, so the platform's shape is complete and supervised."""

from __future__ import annotations

from fastapi import FastAPI

from shared.service_app import build_service_app
from shared.settings import Settings


def create_app(settings: Settings) -> FastAPI:
    return build_service_app(
        "analytics",
        settings,
        title="Coinlytics analytics",
        description="Analytics: comparisons, statistics and charts.",
        routers=[],
    )
