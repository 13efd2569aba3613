"""services.core.runtime and entrypoint: the startup heap leaves the collector's scans; a service's settings."""

from __future__ import annotations

import gc

import pytest
from pydantic import ValidationError

from services.core.entrypoint import loop_factory, service_name_of
from services.core.runtime import freeze_startup_heap
from services.inference.settings import InferenceSettings
from services.registry.settings import RegistrySettings


def _in_oldest_generation(obj: object) -> bool:
    return any(o is obj for o in gc.get_objects(generation=2))


def test_freeze_startup_heap_moves_the_live_objects_out_of_full_collections():
    startup = [{"i": i} for i in range(1000)]
    try:
        gc.collect()
        assert _in_oldest_generation(startup)  # what a full collection walks
        freeze_startup_heap()
        assert gc.get_freeze_count() >= len(startup)
        assert not _in_oldest_generation(startup) and not _in_oldest_generation(startup[0])
        # objects made later are still collected, cycles included
        cycle: list = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()


def test_service_settings_name_the_service_and_its_event_loop(monkeypatch):
    assert service_name_of(RegistrySettings) == "registry" and service_name_of(InferenceSettings) == "inference"
    assert loop_factory("asyncio") is None
    monkeypatch.setenv("YARD_REGISTRY_EVENT_LOOP", "asyncio")
    assert RegistrySettings().event_loop == "asyncio"  # read through the settings class, with its prefix
    monkeypatch.setenv("YARD_REGISTRY_EVENT_LOOP", "tornado")
    with pytest.raises(ValidationError):
        RegistrySettings()
