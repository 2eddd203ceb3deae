"""The DPS emulator's MQTT device endpoint (emulators/dps_mqtt.py), driven by the real ``azure-iot-device``
``ProvisioningDeviceClient`` (through samples/device_renewal.py, the README's device sample) and, for what the SDK
never sends, by a bare MQTT client (paho-mqtt, which the SDK itself is built on). Each rule's source is
learn.microsoft.com/azure/iot/iot-mqtt-connect-to-iot-dps unless the test says otherwise."""

from __future__ import annotations

import json
import secrets
import ssl
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from azure.iot.device.exceptions import ClientError
from azure.iot.deviceprovisioning import DeviceProvisioningClient

from emulators.dps_mqtt import MQTT_PORT
from emulators.stack import APP
from pki.export import cert_pem, chain_pem, key_pem
from samples.device_renewal import register
from tests.x509_helpers import make_chain

pytestmark = pytest.mark.integration


@pytest.fixture
def dps(stack, credential_of) -> DeviceProvisioningClient:
    return DeviceProvisioningClient(stack.dps[0].endpoint, credential_of(APP), connection_verify=str(stack.ca_path))


@pytest.fixture
def device(stack, dps, tmp_path):
    """A device of a fresh enrollment group whose root the DPS instance holds as verified: its chain and key files."""
    registration_id, group_id = f"mqtt-{secrets.token_hex(4)}", f"group-{secrets.token_hex(4)}"
    chain = make_chain(device_id=registration_id, now=datetime.now(UTC))
    stack.dps[0].trust(chain.root, f"test-{registration_id}")
    signing = {"primary": {"certificate": cert_pem(chain.intermediate).decode()}}
    dps.enrollment_group.create_or_update(id=group_id, enrollment_group={
        "enrollmentGroupId": group_id, "attestation": {"type": "x509", "x509": {"signingCertificates": signing}}})
    (tmp_path / "chain.pem").write_bytes(chain_pem([chain.device, chain.intermediate, chain.root]))
    (tmp_path / "device.key").write_bytes(key_pem(chain.device_key))
    return registration_id, group_id, tmp_path / "chain.pem", tmp_path / "device.key", chain


def _sdk_register(stack, registration_id, chain_file, key_file, payload=None):
    return register(stack.device_mqtt_host, stack.dps[0].id_scope, registration_id, str(chain_file), str(key_file),
                    payload=payload, server_verification_cert=stack.ca_path.read_text())


def test_the_device_sdk_registers_over_mqtt_on_port_8883_and_dps_assigns_it_to_the_hub(stack, dps, device):
    registration_id, group_id, chain_file, key_file, _ = device
    result = _sdk_register(stack, registration_id, chain_file, key_file)
    assert result.status == "assigned"
    assert result.registration_state.device_id == registration_id
    assert result.registration_state.assigned_hub == stack.iothub.hostname
    assert result.registration_state.sub_status == "initialAssignment"
    assert dps.device_registration_state.get(registration_id)["status"] == "assigned"
    assert [s["registrationId"] for s in dps.device_registration_state.query(id=group_id)] == [registration_id]
    assert stack.iothub.device_status(registration_id) == "enabled"
    again = _sdk_register(stack, registration_id, chain_file, key_file)  # a new connection, a new session
    assert again.registration_state.sub_status == "reprovisionedToInitialAssignment"


def test_a_certificate_no_verified_ca_reaches_is_refused_with_dps_401_on_the_register_topic(stack, device,
                                                                                               tmp_path):
    """Run as a process of its own: after a refused registration the SDK keeps its connection (register() shuts its
    pipeline down only on "assigned") and, once the server is gone, retries it on a 10 s timer that outlives the
    interpreter's executors; in a process of its own that dies with it."""
    registration_id, _, _, _, _ = device
    stranger = make_chain(device_id=registration_id, now=datetime.now(UTC))  # same CN, a root DPS does not hold
    (tmp_path / "stranger.pem").write_bytes(chain_pem([stranger.device, stranger.intermediate, stranger.root]))
    (tmp_path / "stranger.key").write_bytes(key_pem(stranger.device_key))
    script = (
        "import os, sys\n"
        "from azure.iot.device.exceptions import ClientError\n"
        "from samples.device_renewal import register\n"
        "try:\n"
        "    register(*sys.argv[1:6], server_verification_cert=open(sys.argv[6]).read())\n"
        "except ClientError as exc:\n"
        "    print(type(exc.__cause__).__name__, exc.__cause__, flush=True)\n"
        "    os._exit(3)\n")
    done = subprocess.run([sys.executable, "-c", script, stack.device_mqtt_host, stack.dps[0].id_scope,
                           registration_id, str(tmp_path / "stranger.pem"), str(tmp_path / "stranger.key"),
                           str(stack.ca_path)], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parents[1])
    # the SDK raises ClientError caused by a ServiceError naming DPS's status (pipeline_stages_provisioning.py)
    assert done.returncode == 3, done.stderr
    assert done.stdout.startswith("ServiceError") and "401" in done.stdout


def test_the_server_certificate_is_checked_by_the_sdk(stack, device):
    registration_id, _, chain_file, key_file, _ = device
    with pytest.raises(ClientError) as refused:  # no server_verification_cert: the system roots only
        register(stack.device_mqtt_host, stack.dps[0].id_scope, registration_id, str(chain_file), str(key_file))
    causes, cause = [], refused.value
    while cause is not None:
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    assert any(isinstance(c, ssl.SSLCertVerificationError) for c in causes), causes


class _Bare:
    """A bare MQTT 3.1.1 client over the same mutual TLS, to send what the SDK never would."""

    def __init__(self, stack, chain_file, key_file, client_id: str, username: str, clean_session: bool = True):
        self.client = mqtt.Client(client_id=client_id, protocol=mqtt.MQTTv311, clean_session=clean_session)
        context = ssl.create_default_context(cafile=str(stack.ca_path))
        context.load_cert_chain(str(chain_file), str(key_file))
        self.client.tls_set_context(context)
        self.client.username_pw_set(username)
        self.connack: int | None = None
        self.session_present: int | None = None
        self.granted: list[int] = []
        self.messages: list[tuple[str, bytes, int]] = []  # topic, payload, QoS
        self.closed = threading.Event()
        self.events = threading.Condition()
        self.client.on_connect = lambda c, u, flags, rc: (self._note("session_present", flags["session present"]),
                                                           self._note("connack", rc))
        self.client.on_subscribe = lambda c, u, mid, qos: self._note("granted", list(qos))
        self.client.on_message = lambda c, u, m: self._note("messages", [*self.messages, (m.topic, m.payload, m.qos)])
        self.client.on_disconnect = lambda c, u, rc: self.closed.set()
        self.client.connect(stack.device_mqtt_host, MQTT_PORT)
        self.client.loop_start()

    def _note(self, name: str, value) -> None:
        with self.events:
            setattr(self, name, value)
            self.events.notify_all()

    def wait(self, predicate, timeout: float = 10) -> None:
        with self.events:
            assert self.events.wait_for(predicate, timeout), "no answer from the MQTT endpoint"

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _username(stack, registration_id: str) -> str:
    return f"{stack.dps[0].id_scope}/registrations/{registration_id}/api-version=2019-03-31"


@pytest.mark.parametrize(("client_id", "username", "code"), [
    ("other-device", None, 2),  # "For the ClientId field, use registrationId": identifier rejected
    (None, "no-registrations-in-it", 4),  # "{idScope}/registrations/{registration_id}/api-version=...": bad username
    (None, "SCOPE/registrations/{id}/ClientVersion=x", 4),  # no api-version
    (None, "SCOPE/registrations/{id}/api-version=2021-06-01", 4),  # not the page's api-version=2019-03-31
    # "The {registration_id} in the Username field must match the common name": not authorized
    ("someone-else", "SCOPE/registrations/someone-else/api-version=2019-03-31", 5),
])
def test_connect_refuses_a_client_id_or_username_not_of_the_documented_form(stack, device, client_id, username,
                                                                             code):
    registration_id, _, chain_file, key_file, _ = device
    username = (username or _username(stack, registration_id)).replace("{id}", registration_id)
    bare = _Bare(stack, chain_file, key_file, client_id or registration_id, username)
    try:
        bare.wait(lambda: bare.connack is not None)
        assert bare.connack == code
    finally:
        bare.stop()


def test_only_the_documented_filter_is_granted_at_qos_1_at_most_and_answers_come_only_to_subscribers(stack, device):
    """"DPS only supports documented topic names and topic filters"; "If a device app subscribes to a topic with QoS
    2, DPS grants maximum QoS level 1"; "DPS doesn't support persistent sessions" (CONNACK: no session present)."""
    registration_id, _, chain_file, key_file, _ = device
    bare = _Bare(stack, chain_file, key_file, registration_id, _username(stack, registration_id), clean_session=False)
    try:
        bare.wait(lambda: bare.connack == 0)
        assert bare.session_present == 0  # asked for a persistent session; DPS has none
        body = json.dumps({"registrationId": registration_id}).encode()
        bare.client.publish("$dps/registrations/PUT/iotdps-register/?$rid=1", body, qos=1)
        bare.client.subscribe([("$dps/registrations/res/#", 2), ("devices/+/messages", 1)])
        bare.wait(lambda: bare.granted)
        assert bare.granted == [1, 0x80]
        bare.client.publish("$dps/registrations/PUT/iotdps-register/?$rid=a%26b", body, qos=1)
        bare.wait(lambda: bare.messages)
        topic, answer, qos = bare.messages[0]  # rid 1 went unanswered: not subscribed then
        assert topic == "$dps/registrations/res/202/?$rid=a%26b&retry-after=1"  # $rid back exactly as sent
        assert qos == 1 and json.loads(answer)["status"] == "assigning"
        operation = json.loads(answer)["operationId"]
        for rid in ("p1", "p2"):  # the poll topic: 202 first (honour Retry-After), then the outcome
            bare.client.publish(f"$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId="
                                f"{operation}", b" ", qos=1)
        bare.wait(lambda: len(bare.messages) == 3)
        assert bare.messages[1][0] == "$dps/registrations/res/202/?$rid=p1&retry-after=1"
        assert bare.messages[2][0] == "$dps/registrations/res/200/?$rid=p2"
        assert json.loads(bare.messages[2][1])["registrationState"]["status"] == "assigned"
        bare.client.publish("devices/x/messages/events/", b"{}", qos=1)  # not a DPS topic: DPS closes
        assert bare.closed.wait(5)
    finally:
        bare.stop()


def test_a_qos_2_publish_closes_the_connection(stack, device):
    registration_id, _, chain_file, key_file, _ = device
    bare = _Bare(stack, chain_file, key_file, registration_id, _username(stack, registration_id))
    try:
        bare.wait(lambda: bare.connack == 0)
        assert not bare.closed.is_set()
        bare.client.publish("$dps/registrations/PUT/iotdps-register/?$rid=1",
                            json.dumps({"registrationId": registration_id}).encode(), qos=2)
        assert bare.closed.wait(5)
    finally:
        bare.stop()


def test_one_registration_quota_for_https_and_mqtt(stack, device):
    """The documented 1,000 registrations per minute per instance (about-iot-dps#quotas-and-limits) counts every
    protocol: beyond it the MQTT answer is res/429 with DPS's throttling body."""
    registration_id, _, chain_file, key_file, _ = device
    stack.faults("dps-device", rate_per_s=1)  # one admitted per second
    bare = _Bare(stack, chain_file, key_file, registration_id, _username(stack, registration_id))
    try:
        bare.wait(lambda: bare.connack == 0)
        bare.client.subscribe("$dps/registrations/res/#", 1)
        bare.wait(lambda: bare.granted)
        body = json.dumps({"registrationId": registration_id}).encode()
        for rid in (7, 8):
            bare.client.publish(f"$dps/registrations/PUT/iotdps-register/?$rid={rid}", body, qos=1)
        bare.wait(lambda: len(bare.messages) == 2)
        (first, _, _), (second, refusal, _) = sorted(bare.messages)
        assert first == "$dps/registrations/res/202/?$rid=7&retry-after=1"
        assert second == "$dps/registrations/res/429/?$rid=8&retry-after=1"
        assert json.loads(refusal)["errorCode"] == 429001  # DPS's throttling code
    finally:
        bare.stop()
