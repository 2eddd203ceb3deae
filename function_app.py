"""The Azure Functions app: a table of contents of triggers.

Each trigger decodes its binding, calls one handler and decides between "done", "rejected
(recorded)" and "retry" (raise). The triggers arrive with their features: customer onboarding,
device batches, operator commands and the expiry sweep (see the README).
"""

import azure.functions as func

app = func.FunctionApp()
