"""One thin Lambda handler per state of statemachine/imaging.asl.json: parse the event, call one domain function,
return a small JSON object. Shared wiring (settings, services, event models) is in `runtime` and `events`."""
