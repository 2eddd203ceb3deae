"""The Functions app's edge: wiring clients from settings once, and turning handler outcomes into
"done", "rejected (recorded)" or "retry" for the host. Only function_app.py uses it."""
