"""The local.settings.json the local stack writes is one Core Tools starts with (tests/core_tools.py has the rules
and their sources); the checker itself catches each broken rule."""

from __future__ import annotations

import json

import pytest

from devhost.stack import write_local_settings

from .core_tools import core_tools_problems

IDENTITY = {"FUNCTIONS_WORKER_RUNTIME": "python", "AzureWebJobsStorage__blobServiceUri": "https://127.0.0.1:1/a",
            "AzureWebJobsStorage__queueServiceUri": "https://127.0.0.1:2/a",
            "AzureWebJobsStorage__credential": "managedidentity", "AzureWebJobsStorage__clientId": "x"}


def test_the_written_file_has_the_shape_core_tools_reads(tmp_path):
    path = write_local_settings(IDENTITY, tmp_path / "local.settings.json")
    assert core_tools_problems(json.loads(path.read_text())) == []


@pytest.mark.parametrize("document, problem", [
    ({"Values": IDENTITY}, "IsEncrypted must be false"),
    ({"IsEncrypted": False, "Values": {**IDENTITY, "BATCH_CHUNK_ROWS": 500}},
     "Values.BATCH_CHUNK_ROWS must be a string"),
    ({"IsEncrypted": False, "Values": {k: v for k, v in IDENTITY.items() if k != "FUNCTIONS_WORKER_RUNTIME"}},
     "FUNCTIONS_WORKER_RUNTIME must be python"),
    ({"IsEncrypted": False, "Values": {k: v for k, v in IDENTITY.items() if "queue" not in k}},
     "AzureWebJobsStorage__queueServiceUri"),
    ({"IsEncrypted": False, "Values": {**IDENTITY, "WEBSITE_HOSTNAME": "x"}}, "set by Core Tools itself"),
])
def test_the_checker_catches_what_core_tools_refuses(document, problem):
    assert any(problem in p for p in core_tools_problems(document))
