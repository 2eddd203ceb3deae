"""#19: what the app tells Application Insights, read back through the OpenTelemetry SDK's in-memory exporters: the
metrics and log attributes of one batch and one command (the app on in-memory fakes, driven through ``edge`` as the
host drives it), Key Vault's sign metrics against the emulator, and the exporters ``configure`` sets up.

The SDK's providers are process-wide and set once: a module fixture installs an in-memory metric reader and log
exporter, and each test reads what changed."""

from __future__ import annotations

import json

import pytest
from opentelemetry import _logs, metrics
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import InMemoryLogExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from edge.telemetry import CONTEXT_FIELDS, configure, install_log_context, peek
from handlers.records import device_document

from .worlds import FakeApp


class Telemetry:
    def __init__(self):
        self.reader = InMemoryMetricReader()
        self.logs = InMemoryLogExporter()

    def points(self) -> dict[str, list]:
        """Every data point of every metric so far (cumulative), by metric name."""
        found: dict[str, list] = {}
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    found.setdefault(metric.name, []).extend(metric.data.data_points)
        return found

    def total(self, name: str, **attributes: str) -> float:
        """A counter's sum (a histogram's count) over the points whose attributes include ``attributes``."""
        total = 0.0
        for point in self.points().get(name, []):
            if all(point.attributes.get(k) == v for k, v in attributes.items()):
                total += getattr(point, "value", None) if hasattr(point, "value") else point.count
        return total


@pytest.fixture(scope="module")
def telemetry():
    import logging

    seen = Telemetry()
    metrics.set_meter_provider(MeterProvider(metric_readers=[seen.reader]))
    logs = LoggerProvider()
    logs.add_log_record_processor(SimpleLogRecordProcessor(seen.logs))
    _logs.set_logger_provider(logs)
    handler = LoggingHandler(level=logging.INFO, logger_provider=logs)
    install_log_context(handler)  # as configure() puts the context filter on the exporters' handlers
    app_log = logging.getLogger("pki")
    level = app_log.level
    app_log.setLevel(logging.INFO)  # as the Functions worker passes the app's Information logs on
    app_log.addHandler(handler)
    configure({})  # no exporter asked for: only the log context is installed
    yield seen
    app_log.removeHandler(handler)
    app_log.setLevel(level)


def _records(telemetry: Telemetry, contains: str) -> list:
    return [r.log_record for r in telemetry.logs.get_finished_logs() if contains in str(r.log_record.body)]


def test_a_batch_emits_issued_certificates_its_duration_and_rate_and_logs_with_its_context(telemetry, tmp_path):
    app = FakeApp(tmp_path)
    app.onboard("metrics-co")
    issued_before = telemetry.total("pki.certificates.issued", customer="metrics-co", issuedBy="batch")
    app.upload("metrics-co/line-1.csv", b"deviceId\n" + b"".join(f"mx-{i}\n".encode() for i in range(5)))
    assert app.store.get(device_document("mx-4")).data["status"] == "issued"

    assert telemetry.total("pki.certificates.issued", customer="metrics-co", keySource="generated",
                           issuedBy="batch") - issued_before == 5
    durations = [p for p in telemetry.points()["pki.batch.duration"] if p.attributes == {"customer": "metrics-co"}]
    rates = [p for p in telemetry.points()["pki.batch.rate"] if p.attributes == {"customer": "metrics-co"}]
    assert sum(p.count for p in durations) == 1 and sum(p.count for p in rates) == 1

    # every log record of the chunk's delivery carries the batch's context as attributes
    chunk_logs = _records(telemetry, "from batch-chunks")
    assert chunk_logs, "the chunk delivery logged its outcome"
    attributes = chunk_logs[-1].attributes
    assert {k: attributes[k] for k in ("customerId", "batch", "chunk")} == {
        "customerId": "metrics-co", "batch": "line-1.csv", "chunk": "0"}
    assert attributes["messageId"].startswith("m") and set(CONTEXT_FIELDS) <= set(attributes)
    blob_logs = _records(telemetry, "blob device-batches/metrics-co/line-1.csv")
    assert blob_logs[-1].attributes["customerId"] == "metrics-co" and blob_logs[-1].attributes["batch"] == "line-1.csv"

    rejected_before = telemetry.total("pki.rejections", queue="device-batches")
    app.upload("metrics-co/bad.csv", b"serial\n1\n")  # no deviceId column: rejected with the field it names
    assert telemetry.total("pki.rejections", queue="device-batches") - rejected_before == 1


def test_a_command_emits_its_effect_and_logs_with_its_request_and_message_ids(telemetry, tmp_path):
    app = FakeApp(tmp_path)
    app.onboard("command-co")
    command = {"command": "disable-customer", "customerId": "command-co", "reason": "unpaid",
               "requestId": "ops-metrics-1"}
    changed = telemetry.total("pki.commands", command="disable-customer", effect="changed")
    no_op = telemetry.total("pki.commands", command="disable-customer", effect="no-op")
    app.deliver("pki-commands", json.dumps(command).encode())
    app.deliver("pki-commands", json.dumps(command).encode())  # the same requestId again: a no-op
    assert telemetry.total("pki.commands", command="disable-customer", effect="changed") - changed == 1
    assert telemetry.total("pki.commands", command="disable-customer", effect="no-op") - no_op == 1

    logged = _records(telemetry, "requestId ops-metrics-1")
    assert len(logged) == 2
    assert [(r.attributes["customerId"], r.attributes["requestId"]) for r in logged] == [
        ("command-co", "ops-metrics-1")] * 2
    assert logged[0].attributes["messageId"] != logged[1].attributes["messageId"]  # two deliveries

    rejections = telemetry.total("pki.rejections", queue="pki-commands", field="command")
    app.deliver("pki-commands", json.dumps({**command, "command": "explode"}).encode())
    assert telemetry.total("pki.rejections", queue="pki-commands", field="command") - rejections == 1


@pytest.mark.integration
def test_key_vault_signs_their_latency_and_429s_are_counted_per_vault(telemetry, stack, credential_of):
    """The Key Vault client against the emulator with a rate cap: each sign is counted and timed, and each 429
    (which the client retries) counted too."""
    from clients.keyvault import KeyVaultKeyStore
    from emulators.stack import APP
    from pki.keys import KeyType

    vault = stack.keyvault_url.removeprefix("https://")
    keys = KeyVaultKeyStore(stack.keyvault_url, credential_of(APP), connection_verify=str(stack.ca_path),
                            verify_challenge_resource=False, sign_rate_per_s=1000, retry_backoff_factor=0.1)
    try:
        key = keys.create_key("customer-metrics-kv", KeyType.EC_P256)
        sign = keys.signer(key)
        signs = telemetry.total("pki.keyvault.signs", vault=vault)
        timed = telemetry.total("pki.keyvault.sign.duration", vault=vault)
        throttled = telemetry.total("pki.keyvault.throttled", vault=vault)
        stack.faults("keyvault", rate_per_s=2, retry_after=False)
        for _ in range(6):
            sign("ES256", b"\x01" * 32)
    finally:
        stack.clear_faults()
        keys.close()
    assert telemetry.total("pki.keyvault.signs", vault=vault) - signs == 6
    assert telemetry.total("pki.keyvault.sign.duration", vault=vault) - timed == 6
    assert telemetry.total("pki.keyvault.throttled", vault=vault) - throttled >= 1


def test_configure_picks_the_exporter_the_settings_ask_for_and_never_stops_the_app(tmp_path, caplog):
    assert configure({}) == "none"
    with pytest.raises(ValueError, match="PKI_TELEMETRY_EXPORT"):
        configure({"PKI_TELEMETRY_EXPORT": "somewhere"})
    # a broken connection string or an unwritable file: the app still loads its functions, and the log says why
    assert configure({"APPLICATIONINSIGHTS_CONNECTION_STRING": "not a connection string"}) == "none"
    assert configure({"PKI_TELEMETRY_EXPORT": f"file:{tmp_path}/no/such/dir/t.jsonl"}) == "none"
    assert [r.getMessage().split(":")[0] for r in caplog.records if r.name == "pki"] == ["telemetry is off"] * 2


def test_a_logging_call_with_its_own_context_fields_in_extra_keeps_them(telemetry):
    """The context is added by a filter, only where a record lacks the field: a caller's extra= wins, and never
    fails (a record factory would make logging refuse to overwrite the attribute)."""
    import logging

    from edge.telemetry import log_context

    with log_context(customerId="from-context", requestId="r-ctx"):
        logging.getLogger("pki").info("explicit fields", extra={"customerId": "from-extra"})
    record = _records(telemetry, "explicit fields")[-1]
    assert (record.attributes["customerId"], record.attributes["requestId"]) == ("from-extra", "r-ctx")


def test_peek_reads_the_context_fields_and_nothing_from_what_it_cannot_read():
    assert peek(b'{"customerId": "a", "batchName": "b.csv", "chunk": 3, "requestId": "r"}') == {
        "customerId": "a", "batch": "b.csv", "chunk": "3", "requestId": "r"}
    assert peek(b'{"enrollmentGroup": {"enrollmentGroupId": "acme"}}') == {"customerId": "acme"}
    assert peek(b"[" * 100_000) == {} and peek(b"not json") == {} and peek(None) == {}
    assert peek(b'{"requestId": 5, "chunk": true}') == {}


def test_the_production_wiring_counts_the_audit_trail():
    """edge/services.py wraps the audit log it builds, so the metrics above are what Azure gets."""
    import inspect

    from edge import services

    assert "MeteredAuditLog(StoreAuditLog(" in inspect.getsource(services)


def test_a_local_file_export_writes_metrics_and_logs_as_json_lines(tmp_path):
    """`pkictl local up --telemetry file:PATH` (PKI_TELEMETRY_EXPORT): the SDK's console exporters, one JSON object
    per line, appended to the file. In a process of its own: the SDK's providers are set once per process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    target = tmp_path / "telemetry.jsonl"
    script = (
        "import logging\n"
        "from edge.telemetry import configure, log_context\n"
        "from clients.metrics import observe\n"
        f"assert configure({{'PKI_TELEMETRY_EXPORT': 'file:{target}'}}) == 'file:{target}'\n"
        "logging.getLogger('pki').setLevel(logging.INFO)\n"
        "with log_context(customerId='file-co', requestId='r-1'):\n"
        "    logging.getLogger('pki').info('hello from the app')\n"
        "observe({'action': 'disable-customer', 'effect': 'changed', 'customer': 'file-co', 'messageId': 'm1'})\n")
    unset = ("APPLICATIONINSIGHTS_CONNECTION_STRING", "PKI_TELEMETRY_EXPORT")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1], env=env)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    log = next(item for item in lines if item.get("body") == "hello from the app")
    assert log["attributes"]["customerId"] == "file-co" and log["attributes"]["requestId"] == "r-1"
    exported = json.dumps([item for item in lines if "resource_metrics" in item])
    assert '"pki.commands"' in exported and '"disable-customer"' in exported


def test_rejection_fields_a_sender_chooses_cannot_grow_the_metric_without_bound(telemetry):
    """An unknown JSON key or metadata key names the rejection's field: past 50 distinct fields per queue the metric
    counts them as "other"."""
    from clients.metrics import MAX_FIELDS_PER_QUEUE, rejected

    for i in range(MAX_FIELDS_PER_QUEUE + 10):
        rejected("cardinality-queue", f"metadata.x{i}")
    fields = {p.attributes["field"] for p in telemetry.points()["pki.rejections"]
              if p.attributes["queue"] == "cardinality-queue"}
    assert len(fields) == MAX_FIELDS_PER_QUEUE + 1 and "other" in fields
    assert telemetry.total("pki.rejections", queue="cardinality-queue", field="other") == 10
