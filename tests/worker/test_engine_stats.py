"""One table (app.infra.worker_reports.ENGINE_STATS) says what each reported engine stat means; the
engine's `EngineStats` and the service's `ServiceStats` must report exactly those stats."""
from __future__ import annotations

from dataclasses import fields

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from app.infra.worker_reports import ENGINE_STATS, EXPORTED_ENGINE_STATS
from worker.engine.stats import TENSOR_PARALLEL_FIELDS, EngineStats
from worker.engine_service import ServiceStats
from worker.metrics import WorkerMetrics


def test_the_table_names_every_reported_stat():
    service_fields = {f.name for f in fields(ServiceStats)} - {"engine"}
    assert set(ENGINE_STATS) == {f.name for f in fields(EngineStats)} | service_fields
    assert all(stat.kind in ("gauge", "counter") for stat in EXPORTED_ENGINE_STATS.values())


def test_a_single_device_report_has_no_tensor_parallel_keys():
    single = ServiceStats(EngineStats(running=2), jobs_in_flight=3).as_dict()
    assert single["running"] == 2 and single["jobs_in_flight"] == 3
    assert not set(TENSOR_PARALLEL_FIELDS) & set(single)
    parallel = EngineStats(tensor_parallel_size=2, healthy=False, tensor_parallel_error="rank 1 died").as_dict()
    assert parallel["healthy"] is False and parallel["tensor_parallel_error"] == "rank 1 died"


def test_worker_metrics_export_the_tables_metrics():
    metrics = WorkerMetrics("tiny")
    snapshot = ServiceStats(EngineStats(running=1, kv_blocks_used=3, kv_blocks_total=12, steps=7,
                                        failed_steps=1), jobs_in_flight=2)
    metrics.attach(lambda: snapshot, lambda: True)
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())}
    for key, stat in EXPORTED_ENGINE_STATS.items():
        family = families[stat.metric]
        assert (family.type, family.documentation) == (stat.kind, stat.help)
        assert family.samples[0].labels == {"model_name": "tiny"}
        assert family.samples[0].value == snapshot.as_dict()[key]
    assert families["genq_kv_cache_usage_perc"].samples[0].value == 0.25
    assert not any("failed_steps" in name for name in families)
