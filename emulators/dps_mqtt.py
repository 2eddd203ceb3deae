"""DPS's MQTT device endpoint: what the Azure IoT device SDKs (``azure-iot-device``'s ``ProvisioningDeviceClient``)
speak to DPS, over the same registration logic as the HTTPS endpoint (``DpsDeviceEndpoint``).

Behaviour, from learn.microsoft.com/azure/iot/iot-mqtt-connect-to-iot-dps ("Communicate with DPS using the MQTT
protocol"; quoted) and the MQTT 3.1.1 standard (section numbers), unless marked as the emulator's own choice:

- "MQTT v3.1.1 on port 8883" (MQTT over WebSocket on 443 is not served), and "the client must connect over TLS 1.2":
  the TLS version is capped at 1.2. X.509 client certificates only (the emulator attests X.509, no SAS). The SDK's
  MQTT transport connects to port 8883 when not on WebSocket (azure/iot/device/common/mqtt_transport.py), so each
  stack gets a loopback address of its own (``127.x.y.z``), with the same CA's certificate for it.
- CONNECT: "For the ClientId field, use registrationId"; "For the Username field, use
  ``{idScope}/registrations/{registration_id}/api-version=2019-03-31``"; "The {registration_id} in the Username field
  must match the common name" of the device certificate. Refusals come in CONNACK (section 3.2.2.3): protocol level
  not 4, UNACCEPTABLE_PROTOCOL; a client id other than the username's registration id, IDENTIFIER_REJECTED; a
  username not of that form or another api-version, BAD_USERNAME_OR_PASSWORD; no client certificate, or a CN other
  than the registration id, NOT_AUTHORIZED. The page does not say which codes DPS uses: these are the emulator's
  picks under table 3.1. A protocol name other than "MQTT" closes the connection with no CONNACK (3.1.2.1).
- "DPS doesn't support persistent sessions. It treats every session as non-persistent, regardless of the value of
  the CleanSession flag": CONNACK never reports a present session, and nothing outlives the connection.
- SUBSCRIBE: "DPS only supports documented topic names and topic filters": only ``$dps/registrations/res/#`` is
  granted, any other filter gets 0x80 in the SUBACK (3.9.3). "When a device app subscribes to a topic with QoS 2,
  DPS grants maximum QoS level 1 in the SUBACK packet": ``min(requested, 1)``, and answers go out at the granted
  QoS. A requested QoS above 2 or an empty list closes the connection (3.8.3-3, 3.8.3-4).
- PUBLISH ``$dps/registrations/PUT/iotdps-register/?$rid={request_id}`` with the DeviceRegistration JSON, and
  ``$dps/registrations/GET/iotdps-get-operationstatus/?$rid={request_id}&operationId={operationId}`` to poll. Answers
  go to ``$dps/registrations/res/{status}/?$rid={request_id}``, with ``&retry-after={seconds}`` on a 202, and the
  body the HTTPS endpoint would answer (RegistrationOperationStatus, or DPS's error body); ``$rid`` comes back exactly
  as sent. The page describes answers to a device that "has already subscribed to the ``$dps/registrations/res/#``
  topic"; the emulator's stricter reading: a device not subscribed gets no answer. A publish to any other topic, or
  at QoS 2, closes the connection: the emulator's reading of "only supports documented topic names" (MQTT 3.1.1 has
  no other way for a server to refuse a publish; the page says nothing of QoS 2 publishes).
- Keep-alive: a connection silent for one and a half keep-alive periods is closed (3.1.2.10); before CONNECT, the
  emulator waits 10 s.
- The device registration quota (the ``dps-device`` gate, ``EmulatorStack.azure_quotas``) counts MQTT registrations
  and polls as well: beyond it the answer is ``res/429`` with DPS's throttling body.
- An emulator bug answers ``res/500`` and is logged, as the HTTPS endpoints answer 500.

Packets are read and written with ``amqtt``'s MQTT codec; the connection is the emulators' own pyOpenSSL TLS
(emulators/core.py), which is what exposes the chain the device presented.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import random
import re
import socket
import socketserver
import struct
from typing import Any
from urllib.parse import parse_qs, unquote

from amqtt.adapters import ReaderAdapter
from amqtt.errors import AMQTTError, CodecError, MQTTError, NoDataError
from amqtt.mqtt import packet_class
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.connect import ConnectPacket
from amqtt.mqtt.constants import QOS_1
from amqtt.mqtt.packet import CONNECT, DISCONNECT, PINGREQ, PUBACK, PUBLISH, SUBSCRIBE, UNSUBSCRIBE, MQTTFixedHeader
from amqtt.mqtt.pingresp import PingRespPacket
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.mqtt.suback import SubackPacket
from amqtt.mqtt.unsuback import UnsubackPacket
from cryptography import x509
from OpenSSL import SSL

from .core import EmulatorServer, FaultGate, HttpError, Response, presented_chain
from .dps import DpsDeviceEndpoint, common_name, dps_refusal
from .tls import ServerIdentity

log = logging.getLogger("emulators")

MQTT_PORT = 8883  # MQTT over TLS; azure-iot-device's transport connects to it when not on WebSocket
API_VERSION = "2019-03-31"  # the username's, as the page gives it and the SDK sends it (provisioning constant.py)
CONNECT_WAIT_S = 10.0
RESPONSES = "$dps/registrations/res/#"
_REGISTER = re.compile(r"\$dps/registrations/PUT/iotdps-register/\?(?P<query>.*)")
_POLL = re.compile(r"\$dps/registrations/GET/iotdps-get-operationstatus/\?(?P<query>.*)")
_USERNAME = re.compile(r"(?P<id_scope>[^/]+)/registrations/(?P<registration_id>[^/]+)/(?P<query>.*)")
# CONNACK return codes, MQTT 3.1.1 section 3.2.2.3
IDENTIFIER_REJECTED, BAD_USERNAME_OR_PASSWORD, NOT_AUTHORIZED, UNACCEPTABLE_PROTOCOL = 2, 4, 5, 1
SUBSCRIBE_FAILURE = 0x80


class _Closed(Exception):
    """The connection ends: the device left, or broke the protocol in a way DPS answers by closing."""


class _TlsReader(ReaderAdapter):
    """amqtt's reader interface over a blocking pyOpenSSL connection (each connection has its own thread and loop)."""

    def __init__(self, conn: SSL.Connection):
        self._conn = conn

    async def read(self, n: int = -1) -> bytes:
        data = b""
        while len(data) < n:
            try:
                chunk = self._conn.recv(n - len(data))
            except (SSL.ZeroReturnError, SSL.SysCallError, SSL.Error, OSError):
                chunk = b""
            if not chunk:
                break
            data += chunk
        return data

    def feed_eof(self) -> None:
        pass


class _Session(socketserver.BaseRequestHandler):
    server: DpsMqttServer

    def handle(self) -> None:
        conn: SSL.Connection = self.request
        self._receive_timeout(CONNECT_WAIT_S)
        try:
            conn.do_handshake()
        except (SSL.Error, OSError):
            return
        self.chain: list[x509.Certificate] = presented_chain(conn)
        self.granted: int | None = None  # QoS granted on res/#; None: not subscribed
        self.packet_ids = 0
        try:
            asyncio.run(self._run(_TlsReader(conn)))
        except (_Closed, NoDataError, AMQTTError, MQTTError, CodecError, ValueError, UnicodeDecodeError):
            pass  # a malformed packet or a closed connection: the connection ends, as a broker ends it

    def _receive_timeout(self, seconds: float) -> None:
        """How long a read may wait (SO_RCVTIMEO on the socket under TLS): a silent client does not pin a thread."""
        whole = int(seconds)
        # (an SSL.Connection hands socket methods it lacks to its socket)
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                                struct.pack("ll", whole, int((seconds - whole) * 1e6)))

    def _send(self, packet: Any) -> None:
        try:
            self.request.sendall(packet.to_bytes())
        except (SSL.Error, OSError) as exc:
            raise _Closed from exc

    async def _read(self, reader: _TlsReader) -> Any:
        header = await MQTTFixedHeader.from_stream(reader)
        if header is None:
            raise _Closed
        return await packet_class(header).from_stream(reader, fixed_header=header)

    async def _run(self, reader: _TlsReader) -> None:
        connect = await self._read(reader)
        if not isinstance(connect, ConnectPacket):  # MQTT 3.1.1 section 3.1: the first packet is CONNECT
            raise _Closed
        if connect.proto_name != "MQTT":  # section 3.1.2.1: the server may disconnect without a CONNACK
            raise _Closed
        code = self._connect(connect)
        self._send(ConnackPacket.build(0, code))  # session present: never (no persistent sessions)
        if code:
            raise _Closed
        if connect.keep_alive:
            self._receive_timeout(connect.keep_alive * 1.5)  # section 3.1.2.10
        while True:
            packet = await self._read(reader)
            kind = packet.fixed_header.packet_type
            if kind == SUBSCRIBE:
                topics = packet.payload.topics
                if not topics or any(qos > 2 for _, qos in topics):  # sections 3.8.3-3, 3.8.3-4
                    raise _Closed
                codes = []
                for topic, qos in topics:
                    if topic == RESPONSES:
                        self.granted = min(qos, QOS_1)
                        codes.append(self.granted)
                    else:
                        codes.append(SUBSCRIBE_FAILURE)
                self._send(SubackPacket.build(packet.variable_header.packet_id, codes))
            elif kind == UNSUBSCRIBE:
                if RESPONSES in packet.payload.topics:
                    self.granted = None
                self._send(UnsubackPacket.build(packet.variable_header.packet_id))
            elif kind == PUBLISH:
                self._publish(packet)
            elif kind == PINGREQ:
                self._send(PingRespPacket.build())
            elif kind == PUBACK:  # the device acknowledging an answer sent at QoS 1
                continue
            elif kind in (DISCONNECT, CONNECT):  # a second CONNECT is a protocol violation (section 3.1)
                raise _Closed
            else:
                raise _Closed

    def _connect(self, connect: ConnectPacket) -> int:
        if connect.proto_level != 4:
            return UNACCEPTABLE_PROTOCOL
        user = _USERNAME.fullmatch(connect.username or "")
        if user is None or parse_qs(user["query"]).get("api-version") != [API_VERSION]:
            return BAD_USERNAME_OR_PASSWORD
        if connect.client_id != user["registration_id"]:
            return IDENTIFIER_REJECTED
        if not self.chain or common_name(self.chain[0]) != user["registration_id"]:
            return NOT_AUTHORIZED
        self.id_scope, self.registration_id = user["id_scope"], user["registration_id"]
        self.api_version = API_VERSION
        return 0

    def _publish(self, packet: PublishPacket) -> None:
        if packet.qos not in (0, 1):
            raise _Closed
        topic = packet.topic_name or ""
        register, poll = _REGISTER.fullmatch(topic), _POLL.fullmatch(topic)
        # the raw values, split by hand: $rid goes back exactly as it came (decoding would turn %26 into a separator)
        query = dict(part.partition("=")[::2] for part in (register or poll)["query"].split("&")) \
            if register or poll else {}
        if not query.get("$rid"):
            raise _Closed
        if packet.qos == QOS_1:
            self._send(PubackPacket.build(packet.packet_id))
        answer = self.server.gate.check() or self._answer(register is not None, query, packet.data or b"")
        self._respond(query["$rid"], answer)

    def _answer(self, registering: bool, query: dict[str, str], data: bytes) -> Response:
        endpoint = self.server.endpoint
        try:
            if registering:
                try:
                    body = json.loads(data) if data.strip() else None
                except ValueError:
                    return dps_refusal(400, "The registration request is not JSON")
                return endpoint.register(self.id_scope, self.registration_id, self.api_version, self.chain, body)
            return endpoint.operation_status(self.id_scope, self.registration_id, self.api_version, self.chain,
                                             unquote(query.get("operationId", "")))
        except HttpError as exc:
            return exc.response
        except Exception as exc:  # an emulator bug answers 500, as over HTTPS (core.EmulatorServer.dispatch)
            log.exception("dps-mqtt: %s for %s failed", "register" if registering else "poll", self.registration_id)
            return dps_refusal(500, f"{type(exc).__name__}: {exc}")

    def _respond(self, request_id: str, answer: Response) -> None:
        if self.granted is None:
            return
        topic = f"$dps/registrations/res/{answer.status}/?$rid={request_id}"
        retry_after = {k.lower(): v for k, v in answer.headers.items()}.get("retry-after")
        if retry_after is not None:
            topic += f"&retry-after={retry_after}"
        packet_id = None
        if self.granted == QOS_1:
            self.packet_ids = self.packet_ids % 65535 + 1
            packet_id = self.packet_ids
        body = json.dumps(answer.body).encode() if answer.body is not None else b""
        self._send(PublishPacket.build(topic, body, packet_id, False, self.granted, False))


class DpsMqttServer(EmulatorServer):
    """The MQTT device endpoint on ``127.x.y.z:8883``, sharing the HTTPS device endpoint's state and quota gate."""

    def __init__(self, endpoint: DpsDeviceEndpoint, identity: ServerIdentity, gate: FaultGate):
        self.endpoint = endpoint
        pick = random.SystemRandom()  # not the seedable module state tests may set
        for _ in range(50):
            address = f"127.{pick.randint(1, 254)}.{pick.randint(0, 255)}.{pick.randint(1, 254)}"
            try:
                super().__init__("dps-mqtt", [], identity.for_address(address), client_auth=True, port=MQTT_PORT,
                                 host=address, handler=_Session)
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:  # only Linux answers on all of 127.0.0.0/8; say so elsewhere
                    raise
                continue  # that address's 8883 is taken (another stack): try another
        else:
            raise OSError(errno.EADDRINUSE, f"no free loopback address for port {MQTT_PORT}")
        self._context.set_max_proto_version(SSL.TLS1_2_VERSION)  # "must connect over TLS 1.2"
        self.gate = gate

    @property
    def host(self) -> str:
        """What a device passes as ``provisioning_host`` (global.azure-devices-provisioning.net on Azure)."""
        return self.server_address[0]
