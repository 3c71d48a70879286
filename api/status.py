"""Status endpoints of AI Horde API v2 (more arrive with the compatibility work)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

router = APIRouter(prefix="/api/v2/status", tags=["status"])

VERSION = "2.5.0"


class Heartbeat(BaseModel):
    message: str
    version: str


@router.get("/heartbeat", response_model=Heartbeat)
async def heartbeat() -> Heartbeat:
    """The API process is up and serving."""
    return Heartbeat(message="OK", version=VERSION)
