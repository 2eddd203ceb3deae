"""What Azure Functions Core Tools (`func start`, v4) requires of ``local.settings.json``, read from its source
(Azure/azure-functions-core-tools@3ee97a6337055edd6afe48f9a51786a09772f427, same logic in release 4.13.0):

- ``IsEncrypted`` must be ``false``: missing counts as true, and plain values then fail to decrypt
  (src/Cli/func/Common/AppSettingsFile.cs);
- ``Values`` is read as a dictionary of strings; anything else makes Core Tools drop the whole file with only a
  warning (same file);
- ``FUNCTIONS_WORKER_RUNTIME``: ``python`` for this app (StartHostAction.EnsureWorkerRuntimeIsSet; a missing one
  starts an interactive prompt);
- the host's storage, ``AzureWebJobsStorage`` or an identity-based ``AzureWebJobsStorage__*`` section
  (StartHostAction.ConnectionExists); the blob extension's webhook writes to a queue, so the section needs the queue
  service (``__queueServiceUri``, ``__serviceUri`` or ``__accountName``);
- ``WEBSITE_HOSTNAME`` and ``AzureWebJobsScriptRoot`` are set by Core Tools itself (StartHostAction.
  GetConfigurationSettings) and must not be in ``Values``.
"""

from __future__ import annotations

from typing import Any


def core_tools_problems(document: Any) -> list[str]:
    if not isinstance(document, dict):
        return ["the file must be a JSON object"]
    problems = []
    if document.get("IsEncrypted") is not False:
        problems.append("IsEncrypted must be false (missing counts as true)")
    values = document.get("Values")
    if not isinstance(values, dict):
        return [*problems, "Values must be an object"]
    problems += [f"Values.{k} must be a string" for k, v in values.items() if not isinstance(v, str)]
    if values.get("FUNCTIONS_WORKER_RUNTIME") != "python":
        problems.append("Values.FUNCTIONS_WORKER_RUNTIME must be python")
    identity = {k.split("__", 1)[1] for k in values if k.startswith("AzureWebJobsStorage__")}
    if not values.get("AzureWebJobsStorage") and not identity & {"queueServiceUri", "serviceUri", "accountName"}:
        problems.append("Values: AzureWebJobsStorage, or AzureWebJobsStorage__queueServiceUri (the blob webhook "
                        "writes to a queue), is required")
    problems += [f"Values.{k} is set by Core Tools itself" for k in ("WEBSITE_HOSTNAME", "AzureWebJobsScriptRoot")
                 if k in values]
    return problems
