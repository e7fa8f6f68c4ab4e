"""The web's side of a cold start (docs/models.md): a request for a model with no serving replica
gets one placed at once (tasks/control/cold_start.py) and waits in its model's queue meanwhile;
when nothing can be freed it fails at once, naming what holds every place."""
from __future__ import annotations

import logging

from tasks.client.event_stream import serving
from tasks.client.generation_client import NoReplica
from tasks.control.cluster import ClusterControl, ClusterError, ScaleUpBlocked
from tasks.control.cold_start import NoPlace, ensure_replica, touch

log = logging.getLogger(__name__)


class ColdStarter:
    def __init__(self, client, settings):
        self._client = client
        self._settings = settings
        self._control: ClusterControl | None = None

    def control(self) -> ClusterControl:
        if self._control is None:  # sharing the client's Redis pool and Celery app
            self._control = ClusterControl(self._settings, self._client.redis, self._client.celery)
        return self._control

    def __call__(self, model: str) -> None:
        touch(self._client.redis, model)
        if serving(self._client.replica_states(self._settings.replica_check_interval, model)):
            return
        try:
            outcome = ensure_replica(self.control(), model)
        except (NoPlace, ScaleUpBlocked) as error:
            raise NoReplica(str(error)) from error
        except ClusterError as error:  # another request's start took the slot meanwhile: it comes
            log.info("cold start of %s: %s", model, error)
            return
        if outcome != "serving":
            log.info("cold start of %s: %s", model, outcome)
