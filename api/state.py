"""What the request handlers share in one API process, built once at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from api.accounts import Authenticator, WorkerDirectory
from api.bridge import JobBridge
from api.claims import ClaimsService
from api.intake import Intake
from api.priority import PriorityDesk
from api.queue_positions import QueuePositions
from api.reconciler import Reconciler
from api.result_store import ResultStore
from api.roles import RoleBook
from api.results import ResultsService
from config import ModelReference, Settings


@dataclass
class Horde:
    settings: Settings
    models: ModelReference
    engine: AsyncEngine
    auth: Authenticator
    priority: PriorityDesk
    intake: Intake
    workers: WorkerDirectory
    store: ResultStore
    results: ResultsService
    claims: ClaimsService
    roles: RoleBook
    reconciler: Reconciler
    positions: QueuePositions  # queue positions for the status calls, from a snapshot
    bridge: JobBridge  # HTTP workers (/generate/pop, /generate/submit) onto the queues
