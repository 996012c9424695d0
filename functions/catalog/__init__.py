"""What users and schedules ask of the image catalog: requests for images, schedules and their windows, estimates,
API tokens. Domain code: the state and object stores are handed in; nothing here knows HTTP, the engine or the CLI.
Catalog builds on functions.imaging, never the reverse (retention of scheduled images is imaging's, at Finalize)."""
