"""The shared HTTP session's environment handling (clients/storage.pooled_transport)."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("environ, netrc, trusted", [
    ({}, False, False), ({"HTTPS_PROXY": "http://proxy:3128"}, False, True), ({"https_proxy": "http://p"}, False, True),
    ({"NO_PROXY": "localhost"}, False, True), ({"REQUESTS_CA_BUNDLE": "/etc/ca.pem"}, False, True),
    ({}, True, True), ({"HOME_ONLY": "x"}, False, False)])
def test_sessions_read_the_environment_per_request_only_when_it_holds_a_proxy_ca_bundle_or_netrc(
        tmp_path, environ, netrc, trusted):
    from clients.storage import trust_environment

    if netrc:
        (tmp_path / ".netrc").write_text("machine example.com login a password b\n")
    assert trust_environment(environ, home=str(tmp_path)) is trusted
